# frozen_string_literal: true

require "logger"
require "socket"
require "securerandom"
require "ffi-rzmq"
require_relative "version"
require_relative "errors"
require_relative "protocol"
require_relative "step"

module Stepbroker
  # A handler pool: one DEALER connected to one broker, running steps on a
  # bounded set of worker threads.
  #
  #   pool = Stepbroker::HandlerPool.new(endpoint: "tcp://127.0.0.1:5555", capacity: 4)
  #   pool.handle("process_payment") { |step| { "charged" => step.inputs["validate"]["amount"] } }
  #   pool.register("send_email", EmailHandler.new)   # anything with #call(step)
  #   pool.run                                        # until #close, SIGTERM or SIGINT
  #
  # Threads: only the thread inside #run touches the ZeroMQ socket. It
  # supervises the workers, sends heartbeats, and receives their outcomes
  # through a Queue (woken by a pipe). Handlers run on the workers.
  class HandlerPool
    include Protocol

    # One received attempt. +state+ is :queued, :running or :done; it is
    # changed under the pool's job lock so a queued job can be cancelled or
    # handed back before a worker takes it.
    Job = Struct.new(:step, :state, :cancelled)

    DEFAULTS = {
      capacity: 1,
      encoding: :json,
      heartbeat_ms: Protocol::HEARTBEAT_INTERVAL_MS,
      heartbeat_liveness: Protocol::HEARTBEAT_LIVENESS,
      drain_timeout: 30,
      backoff_ms: 100,
      max_backoff_ms: 5000,
      close_linger_ms: 100,
      include_backtrace: true,
      trap_signals: true
    }.freeze

    NAME_RE = /\A[A-Za-z_][A-Za-z0-9_.:-]{0,127}\z/.freeze
    MAX_POLL_MS = 100

    attr_reader :endpoint, :pool_id, :capacity, :logger, :broker_id, :state, :terms

    # endpoint:           the broker's ZeroMQ endpoint (tcp://host:port, ipc://path)
    # capacity:           most attempts run at once (= worker threads = credit)
    # pool_id:            routing id and name; default "ruby-<host>-<random>"
    # encoding:           :json or :msgpack (asked for in HELLO; falls back to
    #                     JSON when ruby-msgpack is missing)
    # labels:             free-form Hash sent in HELLO
    # logger:             a Logger (default: $stderr, level from STEPBROKER_LOG_LEVEL)
    # heartbeat_ms, heartbeat_liveness: used until WELCOME states the broker's
    #                     (and for the HELLO timeout)
    # drain_timeout:      seconds #close lets running handlers finish
    # backoff_ms, max_backoff_ms: reconnect backoff (doubling)
    # curve:              {server_key:, public_key:, secret_key:} (Z85) for CURVE
    # context:            a ZMQ::Context to share (inproc://); default: own one
    # trap_signals:       #run closes gracefully on TERM and INT (a second
    #                     signal stops the drain)
    def initialize(endpoint:, **opts)
      unknown = opts.keys - DEFAULTS.keys - %i[pool_id labels logger curve context handlers]
      raise ConfigurationError, "unknown option(s): #{unknown.join(', ')}" unless unknown.empty?

      o = DEFAULTS.merge(opts)
      @endpoint = endpoint.to_s
      @capacity = Integer(o[:capacity])
      raise ConfigurationError, "capacity must be 1..10000" unless (1..10_000).cover?(@capacity)

      @pool_id = (o[:pool_id] || "ruby-#{Socket.gethostname}-#{SecureRandom.hex(3)}").to_s
      raise ConfigurationError, "pool_id must be 1..128 characters" unless (1..128).cover?(@pool_id.length)
      raise ConfigurationError, "pool_id must not start with a zero byte" if @pool_id.start_with?("\0")
      # The pool_id is also the routing id (the broker refuses a HELLO whose pool_id differs), and
      # ZeroMQ routing ids are at most 255 bytes.
      raise ConfigurationError, "pool_id must be at most 255 bytes in UTF-8" if @pool_id.bytesize > 255

      # Proves to the broker that a HELLO comes from this process: only a HELLO carrying it may
      # take over this pool_id's registration or adopt its attempts. One per process, sent in
      # every HELLO (reconnects included), never logged.
      @session = SecureRandom.urlsafe_base64(24)

      @requested_encoding = o[:encoding].to_s
      raise ConfigurationError, "encoding must be :json or :msgpack" unless ENCODINGS.include?(@requested_encoding)

      @logger = o[:logger] || default_logger
      if @requested_encoding == "msgpack" && !Protocol.msgpack?
        @logger.warn("stepbroker: msgpack requested but ruby-msgpack is not installed; using JSON")
        @requested_encoding = "json"
      end
      @labels = o[:labels]
      @hb_ms = Integer(o[:heartbeat_ms])
      @liveness = Integer(o[:heartbeat_liveness])
      @drain_timeout = Float(o[:drain_timeout])
      @backoff_min = Integer(o[:backoff_ms])
      @backoff_max = Integer(o[:max_backoff_ms])
      @close_linger_ms = Integer(o[:close_linger_ms])
      @include_backtrace = o[:include_backtrace]
      @trap_signals = o[:trap_signals]
      @curve = o[:curve]
      @shared_context = o[:context]
      @schema = Schema.default

      @handlers = {}
      (o[:handlers] || {}).each { |name, h| register(name, h) }

      @state = :new
      @close_requested = false
      @force_close = false
      @closed_lock = Mutex.new
      @closed_cond = ConditionVariable.new
      @on_welcome = []
    end

    # Registers a block as the handler +name+.
    def handle(name, &block)
      raise ArgumentError, "handle(#{name.inspect}) needs a block" unless block

      register(name, block)
    end

    # Registers +handler+ for +name+: an object with #call(step), or a class
    # whose instances have #call(step) (one instance per attempt), or a block.
    def register(name, handler = nil, &block)
      handler ||= block
      name = name.to_s
      raise ConfigurationError, "handler name #{name.inspect} must match #{NAME_RE.source}" unless NAME_RE.match?(name)
      raise ConfigurationError, "handler #{name} must respond to #call" unless
        handler.respond_to?(:call) || (handler.is_a?(Class) && handler.method_defined?(:call))
      raise ConfigurationError, "handler #{name} is registered twice" if @handlers.key?(name)
      raise ConfigurationError, "register handlers before #run" unless @state == :new

      @handlers[name] = handler
      self
    end

    def handler_names
      @handlers.keys
    end

    # Calls the block with the WELCOME body after every WELCOME (on the loop thread).
    def on_welcome(&block)
      @on_welcome << block
      self
    end

    def welcomed?
      @state == :ready
    end

    def closed?
      @state == :closed
    end

    # Connects and serves steps until #close (or SIGTERM/SIGINT). Blocks.
    def run
      raise ConfigurationError, "register at least one handler before #run" if @handlers.empty?
      raise ConfigurationError, "#run was already called" unless @state == :new

      @loop_thread = Thread.current
      setup
      old_traps = install_traps if @trap_signals
      @logger.info("stepbroker: pool #{@pool_id} starting: endpoint=#{@endpoint} capacity=#{@capacity} " \
                   "handlers=#{@handlers.keys.join(',')} encoding=#{@requested_encoding}")
      connect_and_hello
      yield self if block_given?
      main_loop
    ensure
      restore_traps(old_traps) if old_traps
      teardown
    end

    # Asks #run to close gracefully and returns at once: stop taking work,
    # DISCONNECT handing back attempts not started, let running handlers
    # finish for up to +drain_timeout+ seconds, wait for the ACKs of their
    # results, close. Safe from any thread and from a signal handler.
    def stop(drain_timeout: nil)
      if @close_requested
        @force_close = true
      else
        @close_timeout = drain_timeout
        @close_requested = true
      end
      wake
      nil
    end

    # Like #stop, and waits until #run has finished (unless called from the
    # loop's own thread, where it cannot wait).
    def close(drain_timeout: nil)
      if @state == :new
        @state = :closed
        return
      end
      stop(drain_timeout: drain_timeout)
      return if Thread.current == @loop_thread

      @closed_lock.synchronize do
        @closed_cond.wait(@closed_lock, 1) until @state == :closed
      end
    end

    private

    # ---------------------------------------------------------------- setup

    def default_logger
      l = Logger.new($stderr)
      l.level = ENV.fetch("STEPBROKER_LOG_LEVEL", "info")
      l.progname = "stepbroker"
      l
    end

    def setup
      @ctx = @shared_context || ZMQ::Context.create
      raise Error, "cannot create a ZeroMQ context" unless @ctx

      @wake_r, @wake_w = IO.pipe
      @events = Thread::Queue.new
      @work = Thread::Queue.new
      @jobs_lock = Mutex.new
      @jobs = {}           # attempt_id => Job, received and not finished (or cancelled)
      @unacked = {}        # attempt_id => {item:, sent_at:} results kept until ACK
      @unsent = {}         # attempt_id => true: results to (re)send, in order
      @progress = {}       # attempt_id => latest PROGRESS item
      @outbox = []         # [command, body bytes] waiting for the socket (EAGAIN)
      @hand_back = []      # attempt ids to list in the next DISCONNECT
      # attempt_id => true: cancelled (or handed back) while its handler runs. Each still takes a
      # worker, so HEARTBEAT cancelling lists them and the broker keeps their slots counted
      # against our credit until one returns.
      @lingering = {}
      @hello_running = []
      @socket = nil
      @poller = nil
      @backoff = @backoff_min
      @encoding = "json"
      @terms = { "heartbeat_ms" => @hb_ms, "heartbeat_liveness" => @liveness,
                 "max_message_bytes" => MAX_MESSAGE_BYTES, "max_batch" => MAX_BATCH }
      @last_send = @last_recv = now
      @last_resend_check = now
      @workers = Array.new(@capacity) { |i| start_worker(i) }
    end

    def install_traps
      %w[TERM INT].to_h do |sig|
        [sig, Signal.trap(sig) { stop }]
      end
    rescue ArgumentError
      nil # not the main thread of the main Ractor, or signal unavailable
    end

    def restore_traps(old)
      old.each { |sig, handler| Signal.trap(sig, handler || "DEFAULT") }
    rescue ArgumentError
      nil
    end

    def now
      Process.clock_gettime(Process::CLOCK_MONOTONIC, :millisecond)
    end

    def wake
      @wake_w&.write_nonblock(".", exception: false)
    rescue IOError, ThreadError
      nil # closed, or in a context that cannot write: the poll timeout wakes the loop
    end

    def hb_ms
      @terms["heartbeat_ms"]
    end

    def dead_after_ms
      @terms["heartbeat_ms"] * @terms["heartbeat_liveness"]
    end

    def ids(step)
      "task_id=#{step['task_id']} step_id=#{step['step_id']} attempt_id=#{step['attempt_id']}"
    end

    # --------------------------------------------------------------- socket

    def open_socket
      s = @ctx.socket(ZMQ::DEALER) or raise Error, "cannot create a DEALER socket"
      check_rc(s.setsockopt(ZMQ::IDENTITY, @pool_id.b), "ZMQ_ROUTING_ID")
      check_rc(s.setsockopt(ZMQ::LINGER, 0), "ZMQ_LINGER")
      if @curve
        check_rc(s.setsockopt(ZMQ::CURVE_SERVERKEY, @curve.fetch(:server_key)), "ZMQ_CURVE_SERVERKEY")
        check_rc(s.setsockopt(ZMQ::CURVE_PUBLICKEY, @curve.fetch(:public_key)), "ZMQ_CURVE_PUBLICKEY")
        check_rc(s.setsockopt(ZMQ::CURVE_SECRETKEY, @curve.fetch(:secret_key)), "ZMQ_CURVE_SECRETKEY")
      end
      check_rc(s.connect(@endpoint), "connect #{@endpoint}")
      @socket = s
      @poller = ZMQ::Poller.new
      @poller.register_readable(@socket)
      @poller.register_readable(@wake_r)
      @polling_out = false
    end

    def check_rc(rc, what)
      return if ZMQ::Util.resultcode_ok?(rc)

      raise ConfigurationError, "#{what} failed: #{ZMQ::Util.error_string}"
    end

    def close_socket(linger_ms = 0)
      return unless @socket

      @socket.setsockopt(ZMQ::LINGER, linger_ms)
      @socket.close
      @socket = nil
      @poller = ZMQ::Poller.new
      @poller.register_readable(@wake_r)
      @outbox.clear
    end

    def connect_and_hello
      open_socket unless @socket
      @state = :connecting
      @encoding = "json" # until the next WELCOME
      @outbox.clear
      @hello_running = running_ids
      body = {
        "pool_id" => @pool_id,
        "handlers" => @handlers.keys,
        "capacity" => @capacity,
        "sdk" => { "language" => "ruby", "name" => "stepbroker-ruby", "version" => Stepbroker::VERSION },
        "encoding" => @requested_encoding,
        "session" => @session,
        # Step#trace reads it (PROTOCOL.md, Trace context)
        "trace_context" => true
      }
      body["running"] = @hello_running unless @hello_running.empty?
      body["labels"] = @labels if @labels
      send_message("HELLO", body, "json")
      @hello_deadline = now + (@hb_ms * @liveness)
      @logger.info("stepbroker: HELLO sent to #{@endpoint} as #{@pool_id}" \
                   "#{@hello_running.empty? ? '' : " running=#{@hello_running.size}"}")
    end

    # Closes the socket and reconnects after the backoff (same routing id).
    def schedule_reconnect(why)
      @logger.warn("stepbroker: #{why}; reconnecting in #{@backoff} ms")
      close_socket(0)
      @state = :backoff
      @reconnect_at = now + @backoff
      @backoff = [@backoff * 2, @backoff_max].min
    end

    # Attempts this pool holds and the broker has not acknowledged: running
    # or queued (not cancelled), and finished with a RESULT awaiting ACK.
    def running_ids
      held = @jobs.each_value.reject(&:cancelled).map { |j| j.step.attempt_id }
      (held + @unacked.keys).uniq.first(10_000)
    end

    # ------------------------------------------------------------- sending

    def send_message(command, body, encoding = @encoding)
      bytes = Protocol.encode_body(body, encoding)
      @outbox << [command, bytes]
      flush_outbox
    end

    # Sends what the outbox holds. EAGAIN is back-pressure: the message stays
    # and the loop retries when the socket is writable.
    def flush_outbox
      while @socket && (msg = @outbox.first)
        rc = @socket.send_strings([SIGNATURE, msg[0], msg[1]], ZMQ::DONTWAIT)
        if ZMQ::Util.resultcode_ok?(rc)
          @outbox.shift
          @last_send = now
        elsif ZMQ::Util.errno == ZMQ::EAGAIN || ZMQ::Util.errno == ZMQ::EINTR
          @logger.debug("stepbroker: socket busy (EAGAIN); #{@outbox.size} message(s) wait") unless @polling_out
          break
        else
          schedule_reconnect("send #{msg[0]} failed: #{ZMQ::Util.error_string}")
          break
        end
      end
      want_out = !@outbox.empty? && @socket
      return if want_out == @polling_out

      want_out ? @poller.register_writable(@socket) : (@socket && @poller.deregister_writable(@socket))
      @polling_out = want_out ? true : false
    end

    def reply_error(fault, frames)
      command = frames.is_a?(Array) && frames.size >= 2 ? frames[1].to_s.b : nil
      @logger.warn("stepbroker: bad message from broker (#{fault.code}): #{fault.message}")
      return if command == "ERROR".b          # never answer an ERROR with an ERROR
      return unless @state == :ready           # before WELCOME a pool sends nothing but HELLO

      send_message("ERROR", fault.to_error_body)
    end

    # RESULTs in batches of at most max_batch and max_message_bytes.
    def flush_results
      return unless @state == :ready

      while @outbox.empty? && !@unsent.empty?
        batch = @unsent.keys.first(@terms["max_batch"])
        bytes = nil
        loop do
          bytes = Protocol.encode_body({ "results" => batch.map { |id| @unacked[id][:item] } }, @encoding)
          break if bytes.bytesize <= @terms["max_message_bytes"]

          if batch.size > 1
            batch = batch.first(batch.size / 2)
          else
            shrink_result(batch[0])
          end
        end
        t = now
        batch.each do |id|
          @unsent.delete(id)
          @unacked[id][:sent_at] = t
        end
        @outbox << ["RESULT", bytes]
        flush_outbox
      end
    end

    # A result too large for one message becomes an error result.
    def shrink_result(id)
      entry = @unacked[id]
      size = Protocol.encode_body(entry[:item], @encoding).bytesize
      @logger.error("stepbroker: result of attempt_id=#{id} is #{size} bytes, over max_message_bytes; sending an error instead")
      entry[:item] = {
        "attempt_id" => id, "status" => "error",
        "error" => { "type" => Protocol::OUTPUT_TOO_LARGE, "retryable" => false,
                     "message" => "The handler's result is #{size} bytes; the broker accepts at most " \
                                  "#{@terms['max_message_bytes']} bytes per message." }
      }
    end

    def flush_progress
      return unless @state == :ready && @outbox.empty? && !@progress.empty?

      items = @progress.values.select { |p| (j = @jobs[p["attempt_id"]]) && !j.cancelled }
      @progress.clear
      items.each_slice(@terms["max_batch"]) { |slice| send_message("PROGRESS", { "progress" => slice }) }
    end

    def send_disconnect(reason)
      body = { "reason" => reason }
      body["handed_back"] = @hand_back.uniq.first(10_000) unless @hand_back.empty?
      @logger.info("stepbroker: DISCONNECT (#{reason}) handed_back=#{@hand_back.size}")
      @hand_back.clear
      @disconnect_sent = true
      send_message("DISCONNECT", body)
    end

    # ----------------------------------------------------------- main loop

    def main_loop
      until @state == :closed
        poll_once
        drain_wake
        process_events
        receive_messages if @socket
        tick
        flush_results
        flush_progress
        tick_close if @closing || @close_requested
      end
    end

    def poll_once
      timeout = MAX_POLL_MS
      case @state
      when :ready
        timeout = [timeout, @last_send + hb_ms - now].min
      when :backoff
        timeout = [timeout, @reconnect_at - now].min
      end
      timeout = 0 if timeout.negative? || !@events.empty?
      rc = @poller.poll(timeout)
      return unless rc.negative?

      sleep(0.001) unless ZMQ::Util.errno == ZMQ::EINTR # never spin on a poll error
    end

    def drain_wake
      loop { break unless @wake_r.read_nonblock(4096, exception: false).is_a?(String) }
    end

    def receive_messages
      256.times do
        break unless @socket

        parts = []
        rc = @socket.recv_strings(parts, ZMQ::DONTWAIT)
        break unless ZMQ::Util.resultcode_ok?(rc)

        handle_frames(parts)
      end
    end

    def handle_frames(frames)
      @last_recv = now
      msg = Protocol.decode(frames, accept: POOL_ACCEPTS, max_bytes: @terms["max_message_bytes"], schema: @schema)
      return reply_error(msg, frames) if msg.is_a?(Protocol::Fault)

      body = msg.body
      case msg.command
      when "WELCOME" then on_welcome_message(body)
      when "STEP" then on_step(body)
      when "ACK" then on_ack(body)
      when "CANCEL" then on_cancel(body)
      when "HEARTBEAT" then nil
      when "DISCONNECT" then on_disconnect(body)
      when "ERROR" then on_error(body)
      end
    rescue StandardError => e
      @logger.error("stepbroker: internal error handling #{msg.respond_to?(:command) ? msg.command : 'a message'}: " \
                    "#{e.class}: #{e.message} #{e.backtrace&.first}")
      if @state == :ready && !(msg.respond_to?(:command) && msg.command == "ERROR")
        send_message("ERROR", { "code" => "internal_error", "message" => "The pool failed handling the message: #{e.class}"[0, 8192] })
      end
    end

    def on_welcome_message(body)
      @terms = body.slice("heartbeat_ms", "heartbeat_liveness", "max_message_bytes", "max_batch")
      @terms.transform_values!(&:to_i)
      @broker_id = body["broker_id"]
      @encoding = body["encoding"] == "msgpack" && Protocol.msgpack? ? "msgpack" : "json"
      @state = :ready
      @backoff = @backoff_min
      @disconnect_sent = false
      adopted = body["adopted"].to_h { |id| [id, true] }
      @hello_running.each do |id|
        job = @jobs[id]
        next if job.nil? || adopted[id]

        @logger.warn("stepbroker: attempt_id=#{id} was not adopted by the broker; cancelling it (its result would be stale)")
        cancel_job(job, "not_adopted")
      end
      @hello_running = []
      @unacked.each_key { |id| @unsent[id] = true }  # resend every unacknowledged result
      @logger.info("stepbroker: WELCOME from broker #{@broker_id}: encoding=#{@encoding} heartbeat_ms=#{hb_ms} " \
                   "liveness=#{@terms['heartbeat_liveness']} max_batch=#{@terms['max_batch']} adopted=#{adopted.size} " \
                   "resending=#{@unsent.size}")
      @on_welcome.each do |cb|
        cb.call(body)
      rescue StandardError => e
        @logger.error("stepbroker: on_welcome hook raised #{e.class}: #{e.message}")
      end
      send_disconnect("pool closing") if @closing
    end

    def on_step(body)
      body["steps"].each do |s|
        id = s["attempt_id"]
        if @jobs.key?(id) || @unacked.key?(id)
          @logger.warn("stepbroker: STEP repeats attempt_id=#{id}; ignored")
          @unsent[id] = true if @unacked.key?(id) && @unacked[id][:sent_at]
          next
        end
        if @closing
          @logger.info("stepbroker: STEP while closing; handing back #{ids(s)}")
          @hand_back << id
          next
        end
        unless @handlers.key?(s["handler"])
          @logger.error("stepbroker: no handler #{s['handler'].inspect} in this pool; #{ids(s)}")
          add_result({ "attempt_id" => id, "status" => "error",
                       "error" => { "type" => Protocol::UNKNOWN_HANDLER, "retryable" => true,
                                    "message" => "Pool #{@pool_id} has no handler #{s['handler'].inspect}; " \
                                                 "it serves #{@handlers.keys.join(', ')}" } })
          next
        end
        step = Step.new(s, on_progress: method(:enqueue_progress), logger: StepLogger.new(@logger, s))
        job = Job.new(step, :queued, false)
        @jobs[id] = job
        @work << job
        @logger.debug("stepbroker: STEP #{s['step_name']} handler=#{s['handler']} attempt=#{s['attempt']}/#{s['max_attempts']} #{ids(s)}")
      end
      return unless @jobs.size > @capacity

      @logger.warn("stepbroker: broker sent more attempts than the capacity (#{@jobs.size} > #{@capacity}); they wait")
    end

    def on_ack(body)
      body["acks"].each do |ack|
        id = ack["attempt_id"]
        @unsent.delete(id)
        entry = @unacked.delete(id)
        level = %w[stored duplicate].include?(ack["outcome"]) ? :debug : :info
        @logger.send(level, "stepbroker: ACK attempt_id=#{id} outcome=#{ack['outcome']}#{entry ? '' : ' (not held)'}")
      end
    end

    def on_cancel(body)
      body["cancels"].each do |c|
        job = @jobs[c["attempt_id"]]
        if job.nil?
          @logger.debug("stepbroker: CANCEL for attempt_id=#{c['attempt_id']} which is not running; ignored")
          next
        end
        @logger.info("stepbroker: CANCEL (#{c['reason']}) #{ids(job.step.data)}")
        cancel_job(job, c["reason"])
      end
    end

    # A queued job is dropped (it never runs, nothing is sent); a running one
    # gets its cancelled flag, is listed in HEARTBEAT cancelling until its
    # handler returns, and its result, if any, is still sent.
    def cancel_job(job, reason)
      was = @jobs_lock.synchronize do
        job.cancelled = true
        state = job.state
        job.state = :done if state == :queued
        state
      end
      @jobs.delete(job.step.attempt_id) if was == :queued
      @lingering[job.step.attempt_id] = true if was == :running
      job.step.cancel!(reason)
    end

    def on_disconnect(body)
      @logger.warn("stepbroker: DISCONNECT from broker: code=#{body['code'] || '-'} #{body['reason']}")
      schedule_reconnect("broker sent DISCONNECT")
    end

    def on_error(body)
      code = body["code"]
      where = [body["command"] && "command=#{body['command']}", body["attempt_id"] && "attempt_id=#{body['attempt_id']}",
               body["instance_path"] && "instance_path=#{body['instance_path']}"].compact.join(" ")
      case code
      when "hello_required"
        if @state == :ready
          @logger.warn("stepbroker: broker does not know this pool (hello_required); sending HELLO again")
          connect_and_hello
        else
          @logger.debug("stepbroker: hello_required while a HELLO is outstanding; waiting for WELCOME")
        end
      when "shutting_down"
        schedule_reconnect("broker is shutting down")
      when "hello_rejected"
        @logger.error("stepbroker: HELLO rejected: #{body['message']}")
        schedule_reconnect("HELLO rejected")
      else
        if @state == :connecting && body["command"] == "HELLO"
          @logger.error("stepbroker: HELLO refused (#{code}): #{body['message']} #{where}")
          schedule_reconnect("HELLO refused")
        else
          @logger.error("stepbroker: ERROR from broker: #{code}: #{body['message']} #{where}")
        end
      end
    end

    # --------------------------------------------------------------- events

    def enqueue_progress(item)
      @events << [:progress, item]
      wake
    end

    def process_events
      returned = false
      until @events.empty?
        kind, a, b = @events.pop(true)
        case kind
        when :progress
          prev = @progress[a["attempt_id"]]
          @progress[a["attempt_id"]] = prev ? prev.merge(a) : a
        when :done
          job = a
          id = job.step.attempt_id
          @jobs.delete(id)
          @progress.delete(id)
          if @lingering.delete(id)
            returned = true
            job.step.logger.info("returned after it was cancelled (#{job.step.cancel_reason}); its worker is free again")
          end
          next if job.state == :abandoned

          add_result(b)
        end
      end
    rescue ThreadError
      nil # queue emptied meanwhile
    ensure
      # The broker counts those slots as taken until a HEARTBEAT stops listing them: say so now.
      heartbeat if returned
    end

    # Complete results are valid by construction (ids from a validated STEP,
    # output made JSON by jsonify); error results carry user data, so they are
    # checked against result.json before they leave.
    def add_result(item)
      problem = item["status"] == "error" && @schema.validate("RESULT", { "results" => [item] })
      if problem
        @logger.error("stepbroker: result of attempt_id=#{item['attempt_id']} is invalid " \
                      "(#{problem.instance_path} #{problem.message}); sending an error instead")
        item = { "attempt_id" => item["attempt_id"], "status" => "error",
                 "error" => { "type" => Protocol::INVALID_RESULT, "retryable" => false,
                              "message" => "The pool built an invalid result: #{problem.instance_path} #{problem.message}"[0, 8192] } }
      end
      @unacked[item["attempt_id"]] = { item: item, sent_at: nil }
      @unsent[item["attempt_id"]] = true
    end

    # ---------------------------------------------------------------- timers

    def tick
      t = now
      case @state
      when :backoff
        connect_and_hello if t >= @reconnect_at
      when :connecting
        schedule_reconnect("no WELCOME within #{@hb_ms * @liveness} ms") if t >= @hello_deadline
      when :ready
        if t - @last_recv > dead_after_ms
          schedule_reconnect("no message from the broker for #{dead_after_ms} ms")
          return
        end
        resend_stale_results(t)
        heartbeat if t - @last_send >= hb_ms && @outbox.empty?
      end
    end

    # Always with cancelling, so the broker knows which cancelled handlers still run.
    def heartbeat
      return unless @state == :ready

      send_message("HEARTBEAT", { "in_flight" => @jobs.size, "cancelling" => @lingering.keys.first(10_000) })
    end

    # A RESULT without ACK for heartbeat_ms x liveness is sent again (the
    # broker answers duplicates with ACK duplicate).
    def resend_stale_results(t)
      return if t - @last_resend_check < hb_ms

      @last_resend_check = t
      @unacked.each do |id, entry|
        next unless entry[:sent_at] && t - entry[:sent_at] > dead_after_ms

        @logger.info("stepbroker: no ACK for attempt_id=#{id} after #{dead_after_ms} ms; resending")
        entry[:sent_at] = nil
        @unsent[id] = true
      end
    end

    # ------------------------------------------------------------- closing

    def tick_close
      t = now
      unless @closing
        @closing = true
        @drain_deadline = t + ((@close_timeout || @drain_timeout) * 1000).to_i
        queued = @jobs_lock.synchronize do
          @jobs.values.select { |j| j.state == :queued }.each { |j| j.state = :done }
        end
        queued.each { |j| @jobs.delete(j.step.attempt_id) }
        @hand_back.concat(queued.map { |j| j.step.attempt_id })
        @logger.info("stepbroker: closing: handing back #{queued.size}, draining #{@jobs.size} running, " \
                     "#{@unacked.size} result(s) awaiting ACK")
        send_disconnect("pool closing") if @state == :ready
      end
      @drain_deadline = t if @force_close
      if t >= @drain_deadline && !@jobs.empty?
        @logger.warn("stepbroker: drain timeout: handing back #{@jobs.size} attempt(s) still running")
        running = @jobs_lock.synchronize do
          busy = @jobs.values.select { |j| j.state == :running }
          @jobs.each_value { |j| j.state = :abandoned }
          busy
        end
        running.each { |j| @lingering[j.step.attempt_id] = true }
        @jobs.each_value do |j|
          @hand_back << j.step.attempt_id unless j.cancelled
          j.step.cancel!("pool_closing")
        end
        @jobs.clear
      end
      send_disconnect("pool closing") if @state == :ready && !@hand_back.empty?

      connected = @state == :ready
      done = @jobs.empty? && @unacked.empty? && (!connected || (@hand_back.empty? && @outbox.empty?))
      if !done && t >= @drain_deadline + dead_after_ms
        @logger.warn("stepbroker: closing with #{@unacked.size} result(s) not acknowledged")
        done = true
      end
      finish if done
    end

    def finish
      @logger.info("stepbroker: pool #{@pool_id} closed")
      close_socket(@close_linger_ms)
      @state = :closed
    end

    def teardown
      @state = :closed
      close_socket(0) if @socket
      stop_workers
      @ctx&.terminate unless @shared_context
      @ctx = nil
      [@wake_r, @wake_w].each { |io| io&.close unless io&.closed? }
      @closed_lock.synchronize { @closed_cond.broadcast }
    end

    # ------------------------------------------------------------- workers

    def start_worker(index)
      Thread.new do
        Thread.current.name = "stepbroker-worker-#{index}"
        Thread.current.report_on_exception = false
        worker_loop
      end
    end

    def stop_workers
      return unless @workers

      @workers.size.times { @work << :stop }
      deadline = now + 500
      @workers.each do |w|
        left = (deadline - now) / 1000.0
        next if left.positive? && w.join(left)

        w.kill # a handler that ignores cancel (or hangs): abandoned
      end
      @workers = nil
    end

    def worker_loop
      while (job = @work.pop) != :stop
        run_job(job)
      end
    end

    def run_job(job)
      claimed = @jobs_lock.synchronize do
        next false unless job.state == :queued

        job.state = :running
        true
      end
      return unless claimed

      item = execute(job.step)
      @jobs_lock.synchronize { job.state = :done unless job.state == :abandoned }
      @events << [:done, job, item]
      wake
    rescue StandardError => e # a bug here must not cost a worker thread
      @logger.error("stepbroker: worker failed on attempt_id=#{job.step.attempt_id}: #{e.class}: #{e.message}")
    end

    def execute(step)
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      step.logger.debug("started")
      handler = @handlers[step.handler]
      handler = handler.new if handler.is_a?(Class)
      value = handler.call(step)
      invalid = nil
      begin
        output = Stepbroker.jsonify(value)
        # What the broker would refuse (and this pool then resend forever) becomes the step's error instead.
        problem = Stepbroker.value_problem(output, Protocol::MAX_VALUE_DEPTH)
        if problem
          code, what, where = problem
          hint = code == "unstorable_value" ? " (PostgreSQL stores no U+0000 or unpaired surrogate; send bytes as base64)" : ""
          invalid = "the handler's output cannot be stored: at #{where.empty? ? '(the output)' : where}, #{what}#{hint}"
        end
      rescue StandardError => e
        invalid = "the handler's return value is not JSON: #{e.message}"
      end
      ms = ((Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0) * 1000).round(3)
      if invalid
        message = Stepbroker.storable_text(invalid)[0, 8192]
        step.logger.error("returned an output it cannot send: #{message}")
        return { "attempt_id" => step.attempt_id, "status" => "error", "duration_ms" => ms,
                 "error" => { "type" => Protocol::INVALID_OUTPUT, "retryable" => false, "message" => message } }
      end
      step.logger.debug("complete in #{ms} ms")
      { "attempt_id" => step.attempt_id, "status" => "complete", "output" => output, "duration_ms" => ms }
    rescue Exception => e # rubocop:disable Lint/RescueException -- every outcome must reach the broker
      ms = ((Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0) * 1000).round(3)
      error_item(step, e, ms)
    end

    def error_item(step, exc, ms)
      retryable = exc.respond_to?(:retryable?) ? (exc.retryable? ? true : false) : true
      err = {
        "type" => (exc.class.name || "Error")[0, 128],
        # Only reported, so an unstorable character in it must not cost the whole result.
        "message" => Stepbroker.storable_text(exc.message)[0, 8192],
        "retryable" => retryable
      }
      after = exc.respond_to?(:retry_after_ms) ? exc.retry_after_ms : nil
      err["retry_after_ms"] = after.to_i.clamp(0, 86_400_000) if after
      details = {}
      if exc.respond_to?(:details) && exc.details.is_a?(Hash)
        details = begin
          d = Stepbroker.jsonify(exc.details)
          # Details the broker would refuse are dropped like details JSON cannot carry.
          Stepbroker.value_problem(d, Protocol::MAX_VALUE_DEPTH) ? {} : d
        rescue StandardError
          {}
        end
      end
      details["backtrace"] = exc.backtrace.first(20).map { |l| Stepbroker.storable_text(l)[0, 2048] } if @include_backtrace && exc.backtrace
      err["details"] = details unless details.empty?
      step.logger.send(retryable ? :warn : :error,
                       "failed (#{err['type']}, retryable=#{retryable}) attempt #{step.attempt}/#{step.max_attempts}: #{err['message']}")
      { "attempt_id" => step.attempt_id, "status" => "error", "error" => err, "duration_ms" => ms }
    end
  end

  # A logger that prefixes each line with a step's name and ids.
  class StepLogger
    def initialize(logger, data)
      @logger = logger
      @prefix = "stepbroker: [#{data['step_name']} handler=#{data['handler']} task_id=#{data['task_id']} " \
                "step_id=#{data['step_id']} attempt_id=#{data['attempt_id']}] "
    end

    %i[debug info warn error fatal].each do |level|
      define_method(level) { |msg = nil, &blk| @logger.send(level) { @prefix + (msg || blk&.call).to_s } }
    end
  end

  # Output values as JSON sees them: String keys, no symbols, UTF-8 text.
  # Raises when a value cannot be represented (invalid UTF-8, NaN).
  def self.jsonify(value)
    case value
    when nil, true, false, Integer then value
    when String then value.encoding == Encoding::UTF_8 && value.valid_encoding? ? value : JSON.parse(JSON.generate(value))
    when Float
      raise ArgumentError, "the output holds a non-finite number (#{value})" unless value.finite?

      value
    else
      JSON.parse(JSON.generate(value))
    end
  end

  # UTF-8 bytes of U+D800..U+DFFF: invalid UTF-8, the form a lone surrogate takes in a Ruby string.
  SURROGATE_BYTES = /\xED[\xA0-\xBF][\x80-\xBF]/n.freeze

  # Text PostgreSQL can store: U+0000 and lone surrogates become U+FFFD (one each, as in the
  # Node and Python SDKs), other invalid bytes too. For text a pool only reports.
  def self.storable_text(text)
    s = text.to_s
    if [Encoding::UTF_8, Encoding::BINARY].include?(s.encoding) && s.b.match?(SURROGATE_BYTES)
      s = s.b.gsub(SURROGATE_BYTES, "\u{FFFD}".b).force_encoding(Encoding::UTF_8)
    end
    s = utf8(s)
    s.include?("\0") ? s.tr("\0", "\u{FFFD}") : s
  end

  # [code, what, pointer] for the first value in a jsonified value that the broker refuses, or nil:
  # the same walk, order and wording as the Node SDK's valueProblem.
  def self.value_problem(value, max_depth)
    found = value_problem_at(value, max_depth, 1)
    found && [found[0], found[1], Protocol.storable_pointer(found[2].reverse)]
  end

  # [code, what, path innermost first]: the path is built only on the way out of a failure.
  def self.value_problem_at(value, max_depth, depth)
    case value
    when String
      what = unstorable_string(value)
      what && ["unstorable_value", "a string holds #{what}", []]
    when Hash, Array
      return ["too_deep", "nesting deeper than #{max_depth} levels", []] if depth > max_depth

      if value.is_a?(Array)
        value.each_with_index do |v, i|
          p = value_problem_at(v, max_depth, depth + 1)
          return p.tap { p[2] << i } if p
        end
      else
        value.each do |k, v|
          what = unstorable_string(k.to_s)
          return ["unstorable_value", "an object key holds #{what}", [k]] if what

          p = value_problem_at(v, max_depth, depth + 1)
          return p.tap { p[2] << k } if p
        end
      end
      nil
    end
  end

  def self.unstorable_string(s)
    return "U+0000" if s.include?("\0")

    "an unpaired surrogate" if s.b.match?(SURROGATE_BYTES)
  end

  def self.utf8(text)
    s = text.to_s.dup
    s.force_encoding(Encoding::UTF_8) if s.encoding == Encoding::BINARY
    s = s.encode(Encoding::UTF_8, invalid: :replace, undef: :replace) unless s.encoding == Encoding::UTF_8
    s.scrub
  end
end
