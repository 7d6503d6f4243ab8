# frozen_string_literal: true

require_relative "errors"

module Stepbroker
  # One attempt of one step, as handed to a handler's #call. Readers expose
  # the fields of STEP.steps[i]; the step can also report progress (which
  # extends the lease) and tells whether the broker cancelled it.
  #
  # Thread-safety: a handler runs on a worker thread; #progress, #cancelled?
  # and #wait may be called from any thread.
  class Step
    FIELDS = %w[task_id step_id attempt_id step_name handler attempt max_attempts timeout_ms
                template context config inputs].freeze

    INTEGER_FIELDS = %w[attempt max_attempts timeout_ms].freeze

    FIELDS.each { |f| define_method(f) { @data[f] } }
    # MessagePack senders may encode integers as floats (msgpackr does above
    # 2^32); the value is the same, so hand the handler an Integer.
    INTEGER_FIELDS.each { |f| define_method(f) { v = @data[f]; v.is_a?(Float) ? v.to_i : v } }

    # The raw STEP item (a Hash with String keys).
    attr_reader :data
    # Why the attempt was cancelled (task_cancelled, timeout, lease_lost,
    # shutdown, or the SDK's own not_adopted / pool_closing), or nil.
    attr_reader :cancel_reason
    # A Logger that prefixes every line with the step's ids.
    attr_reader :logger

    def initialize(data, on_progress: nil, logger: nil)
      @data = data
      @on_progress = on_progress
      @lock = Mutex.new
      @cond = ConditionVariable.new
      @cancelled = false
      @cancel_reason = nil
      @logger = logger
    end

    TRACEPARENT = /\A00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}\z/

    # The attempt's W3C trace context (STEP.steps[i].trace, PROTOCOL.md
    # "Trace context"): +traceparent+ names the attempt's own span, so a
    # handler starts its spans as its children; +trace_id+ is the task's trace.
    Trace = Struct.new(:traceparent, :tracestate, :trace_id, :span_id, :sampled, keyword_init: true)

    # The attempt's Trace, or nil when the broker sent none (an older broker).
    def trace
      return @trace if defined?(@trace)

      t = @data["trace"]
      tp = t.is_a?(Hash) ? t["traceparent"] : nil
      @trace = if tp.is_a?(String) && TRACEPARENT.match?(tp)
                 ts = t["tracestate"]
                 Trace.new(traceparent: tp, tracestate: ts.is_a?(String) ? ts : nil, trace_id: tp[3, 32],
                           span_id: tp[36, 16], sampled: (tp[53, 2].to_i(16) & 1) == 1)
               end
    end

    def first_attempt?
      attempt == 1
    end

    def last_attempt?
      attempt >= max_attempts
    end

    # True once the broker sent CANCEL for this attempt (or the pool is
    # closing and gave up on it). Long handlers should check it and stop.
    def cancelled?
      @cancelled
    end

    # Raises CancelledError when the attempt was cancelled.
    def check_cancelled!
      raise CancelledError, @cancel_reason if @cancelled
    end

    # Sleeps up to +seconds+, returning early when the attempt is cancelled.
    # Returns true when cancelled, false when the time passed.
    def wait(seconds)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds.to_f
      @lock.synchronize do
        until @cancelled
          left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
          break if left <= 0

          @cond.wait(@lock, left)
        end
        @cancelled
      end
    end

    # Tells the broker the attempt is still working (extends its lease to
    # timeout_ms from now). +fraction+ (0..1) and +message+ are shown to
    # operators. Cheap: reports are coalesced and sent by the pool's loop.
    def progress(fraction: nil, message: nil)
      item = { "attempt_id" => attempt_id }
      item["fraction"] = [[Float(fraction), 0.0].max, 1.0].min unless fraction.nil?
      item["message"] = message.to_s[0, 1024] unless message.nil?
      @on_progress&.call(item)
      nil
    end

    # Called by the pool's loop when CANCEL names this attempt.
    def cancel!(reason)
      @lock.synchronize do
        return if @cancelled

        @cancelled = true
        @cancel_reason = reason
        @cond.broadcast
      end
    end

    def to_h
      @data.dup
    end

    def inspect
      "#<Stepbroker::Step #{step_name} handler=#{handler} attempt=#{attempt}/#{max_attempts} " \
        "task_id=#{task_id} step_id=#{step_id} attempt_id=#{attempt_id}#{@cancelled ? ' cancelled' : ''}>"
    end
  end
end
