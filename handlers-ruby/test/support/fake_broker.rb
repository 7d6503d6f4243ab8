# frozen_string_literal: true

require "ffi-rzmq"
require "securerandom"
require "minitest"

# Plays the broker in tests: a real ROUTER socket (ffi-rzmq) bound to a free
# TCP port on 127.0.0.1 (or a given endpoint). Every message it receives is
# decoded and validated with the SDK's protocol checks, so a test fails when
# the pool sends anything PROTOCOL.md does not allow.
class FakeBroker
  P = Stepbroker::Protocol
  Received = Struct.new(:identity, :command, :body, :encoding, :frames)

  class Timeout < StandardError; end

  attr_reader :endpoint, :received

  def initialize(endpoint: "tcp://127.0.0.1:*")
    @ctx = ZMQ::Context.create
    @sock = @ctx.socket(ZMQ::ROUTER)
    setopt_int(ZMQ::LINGER, 0)
    setopt_int(ZMQ::ROUTER_MANDATORY, 1)
    setopt_int(ZMQ::ROUTER_HANDOVER, 1)
    rc = @sock.bind(endpoint)
    raise "bind #{endpoint} failed: #{ZMQ::Util.error_string}" unless ZMQ::Util.resultcode_ok?(rc)

    out = []
    @sock.getsockopt(ZMQ::LAST_ENDPOINT, out)
    @endpoint = out.first.to_s.delete("\0")
    @poller = ZMQ::Poller.new
    @poller.register_readable(@sock)
    @received = []
  end

  # ffi-rzmq 2.0.7 does not know ZMQ_ROUTER_HANDOVER; set ints through libzmq.
  def setopt_int(option, value)
    ptr = FFI::MemoryPointer.new(:int)
    ptr.write_int(value)
    rc = LibZMQ.zmq_setsockopt(@sock.socket, option, ptr, 4)
    raise "setsockopt #{option} failed: #{ZMQ::Util.error_string}" unless ZMQ::Util.resultcode_ok?(rc)
  end

  # The next message, decoded and checked; raises Timeout after +timeout+ s.
  def recv(timeout: 10)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      parts = []
      rc = @sock.recv_strings(parts, ZMQ::DONTWAIT)
      if ZMQ::Util.resultcode_ok?(rc)
        identity, *frames = parts
        msg = P.decode(frames, accept: P::POOL_SENDS)
        if msg.is_a?(P::Fault)
          raise Minitest::Assertion, "pool sent an invalid message (#{msg.code}): #{msg.message} frames=#{frames.inspect[0, 300]}"
        end

        r = Received.new(identity, msg.command, msg.body, msg.encoding, frames)
        @received << r
        return r
      end
      left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      raise Timeout, "no message from the pool within #{timeout} s" if left <= 0

      @poller.poll([(left * 1000).ceil, 100].min)
    end
  end

  # The next message with +command+, skipping those in +skip+; any other
  # command fails the test.
  def expect(command, timeout: 10, skip: %w[HEARTBEAT])
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      raise Timeout, "no #{command} from the pool within #{timeout} s" if left <= 0

      msg = recv(timeout: left)
      return msg if msg.command == command
      next if skip.include?(msg.command)

      raise Minitest::Assertion, "expected #{command}, got #{msg.command} #{msg.body.inspect[0, 300]}"
    end
  end

  # Collects RESULT items until every attempt id in +ids+ has one.
  def expect_results(ids, timeout: 10, skip: %w[HEARTBEAT PROGRESS])
    want = ids.dup
    got = {}
    until want.empty?
      msg = expect("RESULT", timeout: timeout, skip: skip)
      msg.body["results"].each do |r|
        got[r["attempt_id"]] = r
        want.delete(r["attempt_id"])
      end
    end
    got
  end

  def send(identity, command, body, encoding: "json")
    send_frames(identity, P.frames(command, body, encoding))
  end

  def send_frames(identity, frames)
    rc = @sock.send_strings([identity, *frames])
    raise "send failed: #{ZMQ::Util.error_string}" unless ZMQ::Util.resultcode_ok?(rc)
  end

  def welcome(identity, adopted: [], encoding: "json", heartbeat_ms: 5000, liveness: 3, max_batch: 64)
    send(identity, "WELCOME", {
           "broker_id" => "fake-broker", "encoding" => encoding, "heartbeat_ms" => heartbeat_ms,
           "heartbeat_liveness" => liveness, "max_message_bytes" => 1024 * 1024, "max_batch" => max_batch,
           "adopted" => adopted
         }, encoding: encoding)
  end

  def ack(identity, ids, outcome: "stored", encoding: "json")
    send(identity, "ACK", { "acks" => ids.map { |id| { "attempt_id" => id, "outcome" => outcome } } }, encoding: encoding)
  end

  def self.step(handler, config: {}, inputs: {}, context: {}, step_id: SecureRandom.uuid, attempt: 1)
    {
      "task_id" => SecureRandom.uuid, "step_id" => step_id, "attempt_id" => SecureRandom.uuid,
      "step_name" => "#{handler}_step", "handler" => handler, "attempt" => attempt, "max_attempts" => 3,
      "timeout_ms" => 30_000, "template" => { "namespace" => "test", "name" => "t", "version" => "1" },
      "context" => context, "config" => config, "inputs" => inputs
    }
  end

  def close
    @sock&.close
    @sock = nil
    @ctx&.terminate
    @ctx = nil
  end
end
