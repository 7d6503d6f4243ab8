# frozen_string_literal: true

require_relative "test_helper"
require "minitest/mock"

# Unit tests of the SDK's pieces that the socket-level tests cannot reach
# deterministically.
class UnitTest < Minitest::Test
  P = Stepbroker::Protocol

  def quiet
    Logger.new(File::NULL)
  end

  # The SDK ships a copy of protocol/schemas/ so it can be installed alone;
  # this fails when the copy is stale.
  def test_bundled_schemas_match_protocol_schemas
    src = File.join(REPO_ROOT, "protocol", "schemas")
    skip "protocol/schemas not found (SDK installed alone)" unless Dir.exist?(src)
    theirs = Dir[File.join(src, "*.json")].to_h { |f| [File.basename(f), JSON.parse(File.read(f))] }
    ours = Dir[File.join(Stepbroker::Schema::DEFAULT_DIR, "*.json")].to_h { |f| [File.basename(f), JSON.parse(File.read(f))] }
    assert_equal theirs.keys.sort, ours.keys.sort,
                 "refresh with: cp protocol/schemas/*.json handlers-ruby/lib/stepbroker/schemas/"
    theirs.each do |name, schema|
      assert_equal schema, ours[name], "#{name} differs; refresh with: cp protocol/schemas/*.json handlers-ruby/lib/stepbroker/schemas/"
    end
  end

  # The error types an SDK writes are the protocol's, spelled as every SDK spells them.
  def test_pool_error_types_are_the_reserved_ones_of_the_schema
    common = JSON.parse(File.read(File.join(Stepbroker::Schema::DEFAULT_DIR, "common.json")))
    pool_types = common["$defs"]["reserved_error_type"]["oneOf"]
                 .select { |t| t["description"].start_with?("(pool)") }.map { |t| t["const"] }
    assert_equal pool_types.sort, P::POOL_ERROR_TYPES.sort
  end

  def test_every_schema_uses_only_supported_keywords
    P::COMMANDS.each do |c|
      assert_empty Stepbroker::Schema.default.unsupported_keywords(c), c
    end
  end

  def test_patterns_anchor_the_whole_string_as_in_ecmascript
    id = "17579317-5937-4128-866e-8c956a710cd7"
    assert_nil Stepbroker::Schema.default.validate("STATUS", { "request_id" => "r", "task_id" => id })
    f = Stepbroker::Schema.default.validate("STATUS", { "request_id" => "r", "task_id" => "#{id}\nx" })
    assert_equal "pattern", f.keyword
    assert_equal "/task_id", f.instance_path
  end

  # EAGAIN is back-pressure: the message stays queued and is sent later.
  class BusySocket
    attr_reader :sent

    def initialize
      @busy = true
      @sent = []
    end

    def free!
      @busy = false
    end

    def send_strings(parts, _flags)
      return -1 if @busy

      @sent << parts
      0
    end

    def setsockopt(*) = 0
    def close = 0
  end

  class NullPoller
    def register_writable(_) = nil
    def deregister_writable(_) = nil
    def register_readable(_) = nil
  end

  def test_eagain_keeps_the_message_and_retries
    pool = Stepbroker::HandlerPool.new(endpoint: "inproc://unused", trap_signals: false, logger: quiet)
    pool.handle("x") { nil }
    pool.send(:setup)
    sock = BusySocket.new
    pool.instance_variable_set(:@socket, sock)
    pool.instance_variable_set(:@poller, NullPoller.new)
    ZMQ::Util.stub(:errno, ZMQ::EAGAIN) do
      pool.send(:send_message, "HEARTBEAT", { "in_flight" => 0 })
      pool.send(:send_message, "HEARTBEAT", { "in_flight" => 1 })
      assert_empty sock.sent
      assert_equal 2, pool.instance_variable_get(:@outbox).size
      refute_equal :backoff, pool.state, "EAGAIN is not a failure"
      sock.free!
      pool.send(:flush_outbox)
    end
    assert_equal 2, sock.sent.size
    assert_equal [P::SIGNATURE, "HEARTBEAT", '{"in_flight":0}'], sock.sent[0]
    assert_empty pool.instance_variable_get(:@outbox)
  ensure
    pool.instance_variable_set(:@socket, nil)
    pool.send(:teardown)
  end

  def test_output_is_converted_to_json_values
    assert_nil Stepbroker.jsonify(nil)
    assert_equal({ "a" => "b", "n" => [1, 2.5] }, Stepbroker.jsonify({ a: :b, "n" => [1, 2.5] }))
    assert_raises(ArgumentError) { Stepbroker.jsonify(Float::NAN) }
    assert_raises(JSON::GeneratorError) { Stepbroker.jsonify("\xff".b) }
  end

  def test_step_exposes_fields_and_integer_attempts
    data = { "task_id" => "t", "step_id" => "s", "attempt_id" => "a", "step_name" => "n", "handler" => "h",
             "attempt" => 2.0, "max_attempts" => 3, "timeout_ms" => 4_294_967_296.0, "template" => {},
             "context" => { "k" => 1 }, "config" => {}, "inputs" => { "up" => nil } }
    reports = []
    step = Stepbroker::Step.new(data, on_progress: ->(i) { reports << i })
    assert_equal 2, step.attempt
    assert_kind_of Integer, step.timeout_ms
    assert_equal({ "up" => nil }, step.inputs)
    refute step.cancelled?
    step.progress(fraction: 1.5, message: "x")
    assert_equal [{ "attempt_id" => "a", "fraction" => 1.0, "message" => "x" }], reports
    step.cancel!("timeout")
    assert step.cancelled?
    assert step.wait(10), "wait returns at once when cancelled"
    assert_raises(Stepbroker::CancelledError) { step.check_cancelled! }
  end

  def test_step_trace_is_parsed_and_a_malformed_or_missing_one_is_nil
    base = { "task_id" => "t", "step_id" => "s", "attempt_id" => "a", "step_name" => "n", "handler" => "h" }
    assert_nil Stepbroker::Step.new(base).trace, "a broker that sent no trace"
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-5e2a1d9c07b3f4a1-01"
    t = Stepbroker::Step.new(base.merge("trace" => { "traceparent" => tp, "tracestate" => "a=1" })).trace
    assert_equal [tp, "a=1", "4bf92f3577b34da6a3ce929d0e0e4736", "5e2a1d9c07b3f4a1", true],
                 [t.traceparent, t.tracestate, t.trace_id, t.span_id, t.sampled]
    ["00-#{"0" * 32}-5e2a1d9c07b3f4a1-01", tp.upcase, "junk", 7].each do |bad|
      assert_nil Stepbroker::Step.new(base.merge("trace" => { "traceparent" => bad })).trace, bad.to_s
    end
  end

  def test_configuration_errors
    assert_raises(Stepbroker::ConfigurationError) { Stepbroker::HandlerPool.new(endpoint: "x", capacity: 0) }
    assert_raises(Stepbroker::ConfigurationError) { Stepbroker::HandlerPool.new(endpoint: "x", encoding: :xml) }
    assert_raises(Stepbroker::ConfigurationError) { Stepbroker::HandlerPool.new(endpoint: "x", bogus: 1) }
    pool = Stepbroker::HandlerPool.new(endpoint: "x", logger: quiet)
    assert_raises(Stepbroker::ConfigurationError) { pool.register("bad name", ->(_) {}) }
    assert_raises(Stepbroker::ConfigurationError) { pool.register("x", Object.new) }
    pool.handle("ok") { nil }
    assert_raises(Stepbroker::ConfigurationError) { pool.handle("ok") { nil } }
  end

  def test_error_replies_are_valid_error_bodies
    fault = P.decode([P::SIGNATURE, "STEP", '{"steps":[]}'])
    body = fault.to_error_body
    assert_nil Stepbroker::Schema.default.validate("ERROR", body)
    assert_equal "schema_violation", body["code"]
    assert_equal "/steps", body["instance_path"]
  end
end
