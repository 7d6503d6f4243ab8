# frozen_string_literal: true

require_relative "test_helper"
require_relative "support/fake_broker"
require "timeout"
require "tmpdir"
require "fileutils"
require "rbconfig"

# Protocol-level behaviour of HandlerPool, with the test playing the broker on
# a real ROUTER socket. Every wait is bounded; nothing asserts on timing.
class PoolTest < Minitest::Test
  P = Stepbroker::Protocol
  WAIT = 10 # seconds, upper bound of any single wait

  def setup
    @broker = FakeBroker.new
    @pools = []
  end

  # Closes the pools like a well-behaved broker would: every RESULT is
  # acknowledged, so the pools' graceful close does not wait out its timers.
  def teardown
    @pools.each do |pool, _thread|
      pool.stop(drain_timeout: 0)
      pool.stop # a second stop forces the drain to end
    end
    acked = Set.new
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + WAIT
    while @pools.any? { |_p, t| t.alive? } && Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
      @broker.received.select { |m| m.command == "RESULT" }.each do |m|
        ids = m.body["results"].map { |r| r["attempt_id"] }.reject { |id| acked.include?(id) }
        next if ids.empty?

        acked.merge(ids)
        begin
          @broker.ack(m.identity, ids)
        rescue RuntimeError
          nil # the pool has already gone (EHOSTUNREACH)
        end
      end
      begin
        @broker.recv(timeout: 0.05)
      rescue FakeBroker::Timeout, Minitest::Assertion
        nil
      end
    end
    @pools.each { |_p, t| t.join(0.1) or t.kill }
  ensure
    @broker.close # an open ROUTER would block its context's finalizer later
  end

  def logger
    l = Logger.new($stderr)
    l.level = ENV.fetch("STEPBROKER_TEST_LOG_LEVEL", "fatal")
    l
  end

  def start_pool(capacity: 2, pool_id: "rb-#{SecureRandom.hex(3)}", **opts)
    pool = Stepbroker::HandlerPool.new(endpoint: @broker.endpoint, capacity: capacity, pool_id: pool_id,
                                       trap_signals: false, heartbeat_ms: 200, backoff_ms: 20,
                                       max_backoff_ms: 200, logger: logger, **opts)
    pool.handle("echo") { |s| { "inputs" => s.inputs, "context" => s.context, "config" => s.config } }
    yield pool if block_given?
    thread = Thread.new { pool.run }
    thread.report_on_exception = true
    @pools << [pool, thread]
    [pool, thread]
  end

  # Starts a pool and completes the handshake; returns [pool, thread, identity].
  def welcomed_pool(welcome_encoding: "json", **opts, &blk)
    pool, thread = start_pool(**opts, &blk)
    hello = @broker.expect("HELLO")
    @broker.welcome(hello.identity, encoding: welcome_encoding)
    [pool, thread, hello.identity, hello]
  end

  def pop(queue, timeout = WAIT)
    Timeout.timeout(timeout) { queue.pop }
  end

  # --------------------------------------------------------------- handshake

  def test_hello_then_welcome_then_heartbeats
    pool, = start_pool(capacity: 3, labels: { "zone" => "test" })
    hello = @broker.expect("HELLO")
    assert_equal "json", hello.encoding, "HELLO is always JSON"
    assert_equal pool.pool_id, hello.identity, "routing id = pool_id"
    assert_equal pool.pool_id, hello.body["pool_id"]
    assert_equal ["echo"], hello.body["handlers"]
    assert_equal 3, hello.body["capacity"]
    assert_equal "ruby", hello.body["sdk"]["language"]
    assert_equal({ "zone" => "test" }, hello.body["labels"])
    refute hello.body.key?("running"), "nothing to report on a first HELLO"
    assert_equal true, hello.body["trace_context"], "the SDK reads STEP trace context"

    @broker.welcome(hello.identity, heartbeat_ms: 50)
    beat = @broker.expect("HEARTBEAT", skip: [])
    assert_equal 0, beat.body["in_flight"]
  end

  def test_hello_is_resent_when_no_welcome_arrives
    start_pool
    first = @broker.expect("HELLO")
    second = @broker.expect("HELLO") # after heartbeat_ms x liveness without WELCOME
    assert_equal first.body["pool_id"], second.body["pool_id"]
    assert_equal first.identity, second.identity
    assert_match(/\A[A-Za-z0-9_-]{22,128}\z/, first.body["session"], "a per-process session secret")
    assert_equal first.body["session"], second.body["session"], "the same session in every HELLO"
  end

  # ----------------------------------------------------------------- steps

  def test_multi_step_message_runs_every_step_and_keeps_results_until_ack
    _pool, _t, id = welcomed_pool(capacity: 2)
    steps = 3.times.map { |i| FakeBroker.step("echo", config: { "i" => i }, inputs: { "up" => nil }, context: { "k" => "v" }) }
    @broker.send(id, "STEP", { "steps" => steps })
    results = @broker.expect_results(steps.map { |s| s["attempt_id"] })
    steps.each_with_index do |s, i|
      r = results.fetch(s["attempt_id"])
      assert_equal "complete", r["status"]
      assert_equal({ "inputs" => { "up" => nil }, "context" => { "k" => "v" }, "config" => { "i" => i } }, r["output"])
      refute r.key?("error")
    end
    @broker.ack(id, steps.map { |s| s["attempt_id"] })
    # After the ACKs the pool holds nothing: a re-HELLO lists no running attempt.
    @broker.send(id, "ERROR", { "code" => "hello_required", "message" => "who are you?" })
    hello = @broker.expect("HELLO", skip: %w[HEARTBEAT RESULT])
    assert_empty hello.body.fetch("running", [])
  end

  def test_returning_nil_completes_with_null_output_and_raising_fails
    _pool, _t, id = welcomed_pool do |p|
      p.handle("nothing") { |_s| nil }
      p.handle("boom") { |_s| raise ArgumentError, "bad input" }
      p.handle("perm") { |_s| raise Stepbroker::PermanentError, "card declined" }
      p.handle("later") { |_s| raise Stepbroker::RetryableError.new("busy", retry_after_ms: 2000) }
      p.handle("bad_output") { |_s| { "x" => Float::NAN } }
    end
    steps = %w[nothing boom perm later bad_output].map { |h| FakeBroker.step(h) }
    @broker.send(id, "STEP", { "steps" => steps })
    r = @broker.expect_results(steps.map { |s| s["attempt_id"] })
    nothing, boom, perm, later, bad = steps.map { |s| r[s["attempt_id"]] }
    assert_equal "complete", nothing["status"]
    assert nothing.key?("output") && nothing["output"].nil?, "nil output is sent as null"
    assert_equal "error", boom["status"]
    assert_equal "ArgumentError", boom["error"]["type"]
    assert_equal "bad input", boom["error"]["message"]
    assert_equal true, boom["error"]["retryable"]
    refute boom.key?("output")
    assert_equal "Stepbroker::PermanentError", perm["error"]["type"]
    assert_equal false, perm["error"]["retryable"]
    assert_equal true, later["error"]["retryable"]
    assert_equal 2000, later["error"]["retry_after_ms"]
    assert_equal "invalid_output", bad["error"]["type"], "the type every SDK writes for an output JSON cannot carry"
    assert_equal false, bad["error"]["retryable"]
  end

  def test_output_the_broker_would_refuse_is_invalid_output_and_error_text_is_storable
    deep = ->(levels) { (1..levels).reduce(1) { |v, _| [v] } }
    _pool, _t, id = welcomed_pool do |p|
      p.handle("nul_output") { |_s| { "a" => "x\u0000y" } }
      p.handle("deep_output") { |_s| deep.call(60) }
      p.handle("nul_raise") do |_s|
        raise Stepbroker::RetryableError.new("bad \u0000 byte #{"\xED\xB0\x80".dup.force_encoding('UTF-8')}",
                                             details: { "raw" => "a\u0000b" })
      end
      p.handle("long_raise") { |_s| raise ArgumentError, "#{'a' * 8191}\u0000 past the cut" }
      p.handle("fine_output") { |_s| { "emoji" => "\u{1F600}", "deep" => deep.call(55) } }
    end
    steps = %w[nul_output deep_output nul_raise long_raise fine_output].map { |h| FakeBroker.step(h) }
    @broker.send(id, "STEP", { "steps" => steps })
    r = @broker.expect_results(steps.map { |s| s["attempt_id"] })
    nul, deep_r, raised, long, fine = steps.map { |s| r[s["attempt_id"]] }
    [nul, deep_r].each do |item|
      assert_equal "error", item["status"]
      refute item.key?("output")
      assert_equal "invalid_output", item["error"]["type"]
      assert_equal false, item["error"]["retryable"]
    end
    # The same words as the Node pool: where the first offending value is, and what to do.
    assert_equal "the handler's output cannot be stored: at /a, a string holds U+0000 " \
                 "(PostgreSQL stores no U+0000 or unpaired surrogate; send bytes as base64)", nul["error"]["message"]
    assert_equal "the handler's output cannot be stored: at #{'/0' * 56}, nesting deeper than 56 levels",
                 deep_r["error"]["message"]
    # A message is only reported: U+FFFD stands in for what PostgreSQL cannot store; unstorable details go.
    assert_equal "error", raised["status"]
    assert_equal "Stepbroker::RetryableError", raised["error"]["type"]
    assert_equal "bad \u{FFFD} byte \u{FFFD}", raised["error"]["message"]
    assert_equal true, raised["error"]["retryable"]
    refute (raised["error"]["details"] || {}).key?("raw"), "details holding U+0000 are dropped"
    assert_equal "#{'a' * 8191}\u{FFFD}", long["error"]["message"]
    assert_equal "complete", fine["status"]
    assert_equal({ "emoji" => "\u{1F600}", "deep" => deep.call(55) }, fine["output"])
  end

  def test_unknown_handler_is_a_retryable_error_result
    _pool, _t, id = welcomed_pool
    step = FakeBroker.step("not_served")
    @broker.send(id, "STEP", { "steps" => [step] })
    r = @broker.expect_results([step["attempt_id"]]).values.first
    assert_equal "error", r["status"]
    assert_equal "unknown_handler", r["error"]["type"]
    assert_equal true, r["error"]["retryable"]
  end

  # -------------------------------------------------- reconnect and resend

  def test_hello_required_rehello_with_running_and_resend_until_ack
    _pool, _t, id = welcomed_pool
    step = FakeBroker.step("echo")
    a1 = step["attempt_id"]
    @broker.send(id, "STEP", { "steps" => [step] })
    first = @broker.expect_results([a1])[a1]

    # The broker restarted and does not know the pool: no ACK, hello_required.
    @broker.send(id, "ERROR", { "code" => "hello_required", "message" => "send HELLO", "command" => "RESULT" })
    hello = @broker.expect("HELLO", skip: %w[HEARTBEAT RESULT])
    assert_equal [a1], hello.body["running"], "an unacknowledged result is listed in running"

    @broker.welcome(id, adopted: [a1])
    again = @broker.expect_results([a1])[a1]
    assert_equal first, again, "the same result is resent after WELCOME"
    @broker.ack(id, [a1])

    @broker.send(id, "ERROR", { "code" => "hello_required", "message" => "send HELLO" })
    hello = @broker.expect("HELLO", skip: %w[HEARTBEAT RESULT])
    assert_empty hello.body.fetch("running", []), "ACKed results are forgotten"
  end

  def test_resends_unacked_result_after_every_welcome_even_when_not_adopted
    _pool, _t, id = welcomed_pool
    step = FakeBroker.step("echo")
    a1 = step["attempt_id"]
    @broker.send(id, "STEP", { "steps" => [step] })
    @broker.expect_results([a1])
    @broker.send(id, "ERROR", { "code" => "hello_required", "message" => "send HELLO" })
    @broker.expect("HELLO", skip: %w[HEARTBEAT RESULT])
    @broker.welcome(id, adopted: [])
    @broker.expect_results([a1])
    @broker.ack(id, [a1], outcome: "stale")
  end

  def test_broker_restart_reconnects_rehellos_and_resends
    endpoint = @broker.endpoint
    pool, = start_pool
    hello = @broker.expect("HELLO")
    @broker.welcome(hello.identity, heartbeat_ms: 100, liveness: 3)
    step = FakeBroker.step("echo", config: { "x" => 1 })
    a1 = step["attempt_id"]
    @broker.send(hello.identity, "STEP", { "steps" => [step] })
    @broker.expect_results([a1], skip: %w[HEARTBEAT HELLO])

    # Broker dies before the ACK; a new one binds the same endpoint.
    @broker.close
    @broker = FakeBroker.new(endpoint: endpoint)
    hello2 = @broker.expect("HELLO", timeout: WAIT)
    assert_equal pool.pool_id, hello2.identity, "same routing id after reconnect"
    assert_includes hello2.body["running"], a1
    @broker.welcome(hello2.identity, adopted: [a1], heartbeat_ms: 5000)
    result = @broker.expect_results([a1], skip: %w[HEARTBEAT HELLO])[a1]
    assert_equal({ "inputs" => {}, "context" => {}, "config" => { "x" => 1 } }, result["output"])
    @broker.ack(hello2.identity, [a1])
  end

  def test_disconnect_from_broker_makes_the_pool_reconnect
    _pool, _t, id = welcomed_pool
    @broker.send(id, "DISCONNECT", { "code" => "shutting_down", "reason" => "broker stopping" })
    hello = @broker.expect("HELLO")
    assert_equal id, hello.identity
    @broker.welcome(id)
    step = FakeBroker.step("echo")
    @broker.send(id, "STEP", { "steps" => [step] })
    @broker.expect_results([step["attempt_id"]])
  end

  # ---------------------------------------------------------------- cancel

  def test_cancel_sets_the_cancelled_flag_and_the_result_is_still_sent
    started = Queue.new
    seen = Queue.new
    _pool, _t, id = welcomed_pool do |p|
      p.handle("waiter") do |s|
        started << s.attempt_id
        cancelled = s.wait(60)
        seen << [cancelled, s.cancelled?, s.cancel_reason]
        s.check_cancelled!
        "not cancelled"
      end
    end
    step = FakeBroker.step("waiter")
    a1 = step["attempt_id"]
    @broker.send(id, "STEP", { "steps" => [step] })
    assert_equal a1, pop(started)
    @broker.send(id, "CANCEL", { "cancels" => [{ "attempt_id" => a1, "reason" => "task_cancelled" }] })
    assert_equal [true, true, "task_cancelled"], pop(seen)
    r = @broker.expect_results([a1])[a1]
    assert_equal "error", r["status"]
    assert_equal "Stepbroker::CancelledError", r["error"]["type"]
    @broker.ack(id, [a1], outcome: "stale")
  end

  def test_cancel_of_a_queued_attempt_drops_it
    started = Queue.new
    release = Queue.new
    _pool, _t, id = welcomed_pool(capacity: 1) do |p|
      p.handle("blocker") do |s|
        started << s.attempt_id
        release.pop
        "ok"
      end
    end
    s1 = FakeBroker.step("blocker")
    s2 = FakeBroker.step("blocker")
    @broker.send(id, "STEP", { "steps" => [s1, s2] })
    assert_equal s1["attempt_id"], pop(started)
    @broker.send(id, "CANCEL", { "cancels" => [{ "attempt_id" => s2["attempt_id"], "reason" => "timeout" }] })
    # A re-HELLO after the CANCEL shows the dropped attempt is gone.
    @broker.send(id, "ERROR", { "code" => "hello_required", "message" => "send HELLO" })
    hello = @broker.expect("HELLO")
    assert_equal [s1["attempt_id"]], hello.body["running"]
    @broker.welcome(id, adopted: [s1["attempt_id"]])
    release << :go
    results = @broker.expect_results([s1["attempt_id"]])
    refute results.key?(s2["attempt_id"])
    assert_equal 0, started.size, "the cancelled attempt never started"
  end

  # The first HEARTBEAT whose cancelling is +want+ (other HEARTBEATs and RESULTs are skipped).
  def heartbeat_where(want)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + WAIT
    loop do
      left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      beat = @broker.expect("HEARTBEAT", timeout: [left, 0.01].max, skip: %w[RESULT])
      assert beat.body.key?("cancelling"), "every HEARTBEAT carries cancelling"
      return beat if beat.body["cancelling"] == want
    end
  end

  # RESULT items for +ids+: those received since @broker.received[mark], then waits for the rest.
  def results_since(mark, ids)
    got = @broker.received[mark..].select { |m| m.command == "RESULT" }
                 .flat_map { |m| m.body["results"] }.to_h { |r| [r["attempt_id"], r] }
    missing = ids - got.keys
    missing.empty? ? got : got.merge(@broker.expect_results(missing))
  end

  # Handlers "stubborn" that ignore cancel until the test releases them by config key.
  def stubborn_pool(capacity:, started:, releases:)
    pool, = start_pool(capacity: capacity) do |p|
      p.handle("stubborn") do |s|
        started << s
        releases.fetch(s.config["key"]).pop
        s.config["key"]
      end
    end
    pool
  end

  def test_cancelled_handler_that_keeps_running_is_listed_in_every_heartbeat
    started = Queue.new
    release = Queue.new
    stubborn_pool(capacity: 2, started: started, releases: { "a" => release })
    hello = @broker.expect("HELLO")
    id = hello.identity
    @broker.welcome(id, heartbeat_ms: 100, liveness: 100)
    heartbeat_where([])
    step = FakeBroker.step("stubborn", config: { "key" => "a" })
    a = step["attempt_id"]
    @broker.send(id, "STEP", { "steps" => [step] })
    s = pop(started)
    @broker.send(id, "CANCEL", { "cancels" => [{ "attempt_id" => a, "reason" => "timeout" }] })
    heartbeat_where([a])
    heartbeat_where([a]) # not only once: in every HEARTBEAT while it runs
    assert s.cancelled?
    release << :go
    heartbeat_where([])
    assert_equal "a", results_since(0, [a])[a]["output"], "its result is still sent"
    @broker.ack(id, [a], outcome: "stale")
  end

  def test_heartbeat_goes_out_at_once_when_a_cancelled_handler_returns
    started = Queue.new
    releases = { "a" => Queue.new, "b" => Queue.new }
    stubborn_pool(capacity: 2, started: started, releases: releases)
    hello = @broker.expect("HELLO")
    id = hello.identity
    # A one-minute heartbeat: no periodic HEARTBEAT falls inside this test, so each one
    # received is the one sent because a cancelled handler returned.
    @broker.welcome(id, heartbeat_ms: 60_000, liveness: 3)
    sa = FakeBroker.step("stubborn", config: { "key" => "a" })
    sb = FakeBroker.step("stubborn", config: { "key" => "b" })
    a = sa["attempt_id"]
    b = sb["attempt_id"]
    @broker.send(id, "STEP", { "steps" => [sa, sb] })
    steps = [pop(started), pop(started)]
    @broker.send(id, "CANCEL", { "cancels" => [{ "attempt_id" => a, "reason" => "task_cancelled" },
                                               { "attempt_id" => b, "reason" => "timeout" }] })
    Timeout.timeout(WAIT) { sleep 0.01 until steps.all?(&:cancelled?) }
    # cancel! runs after the pool recorded the attempt as lingering, on the loop thread, so a
    # handler released now is seen returning after its CANCEL.
    mark = @broker.received.size
    releases["b"] << :go
    beat = @broker.expect("HEARTBEAT", skip: %w[RESULT])
    assert_equal [a], beat.body["cancelling"], "b returned; a still runs"
    releases["a"] << :go
    beat = @broker.expect("HEARTBEAT", skip: %w[RESULT])
    assert_equal [], beat.body["cancelling"]
    got = results_since(mark, [a, b])
    assert_equal %w[a b], [got[a]["output"], got[b]["output"]]
    beats = @broker.received[mark..].count { |m| m.command == "HEARTBEAT" }
    assert_equal 2, beats, "one HEARTBEAT per returning handler, no periodic one"
    @broker.ack(id, [a, b], outcome: "stale")
  end

  def test_attempt_cancelled_before_it_started_is_never_listed
    started = Queue.new
    release = Queue.new
    stubborn_pool(capacity: 1, started: started, releases: { "a" => release, "q" => Queue.new })
    hello = @broker.expect("HELLO")
    id = hello.identity
    @broker.welcome(id, heartbeat_ms: 100, liveness: 100)
    held = FakeBroker.step("stubborn", config: { "key" => "a" })
    queued = FakeBroker.step("stubborn", config: { "key" => "q" })
    @broker.send(id, "STEP", { "steps" => [held, queued] })
    pop(started)
    @broker.send(id, "CANCEL", { "cancels" => [{ "attempt_id" => queued["attempt_id"], "reason" => "timeout" }] })
    @broker.send(id, "CANCEL", { "cancels" => [{ "attempt_id" => held["attempt_id"], "reason" => "timeout" }] })
    heartbeat_where([held["attempt_id"]]) # the dropped one holds no worker, so it is not listed
    release << :go
    heartbeat_where([])
    assert_equal 0, started.size, "the cancelled queued attempt never started"
  end

  # -------------------------------------------------------------- encodings

  def test_msgpack_session
    _pool, _t, id, hello = welcomed_pool(welcome_encoding: "msgpack", encoding: :msgpack)
    assert_equal "json", hello.encoding, "HELLO is JSON even when asking for msgpack"
    assert_equal "msgpack", hello.body["encoding"]
    step = FakeBroker.step("echo", context: { "n" => 1.5, "list" => [1, "two", nil, true] })
    @broker.send(id, "STEP", { "steps" => [step] }, encoding: "msgpack")
    msg = @broker.expect("RESULT")
    assert_equal "msgpack", msg.encoding, "RESULT uses the negotiated encoding"
    assert_equal({ "inputs" => {}, "context" => { "n" => 1.5, "list" => [1, "two", nil, true] }, "config" => {} },
                 msg.body["results"][0]["output"])
    # JSON is still understood after msgpack was negotiated.
    @broker.ack(id, [step["attempt_id"]], encoding: "json")
  end

  # --------------------------------------------------------------- progress

  def test_progress_is_sent_before_the_result
    _pool, _t, id = welcomed_pool do |p|
      p.handle("slow") do |s|
        3.times do |i|
          s.progress(fraction: (i + 1) / 3.0, message: "part #{i + 1}")
          s.wait(0.05)
        end
        "done"
      end
    end
    step = FakeBroker.step("slow")
    a1 = step["attempt_id"]
    @broker.send(id, "STEP", { "steps" => [step] })
    progress = []
    loop do
      msg = @broker.recv(timeout: WAIT)
      case msg.command
      when "PROGRESS" then progress.concat(msg.body["progress"])
      when "RESULT" then break
      end
    end
    refute_empty progress, "at least one PROGRESS before the RESULT"
    progress.each do |p|
      assert_equal a1, p["attempt_id"]
      assert_includes 0.0..1.0, p["fraction"]
      assert_match(/part \d/, p["message"])
    end
  end

  # -------------------------------------------------------------- bad input

  def test_bad_messages_are_answered_with_error_and_the_pool_keeps_working
    _pool, _t, id = welcomed_pool
    sig = P::SIGNATURE
    cases = [
      [[sig, "HEARTBEAT"], "malformed_frame"],
      [["stepbroker/2", "HEARTBEAT", "{}"], "unsupported_version"],
      [[sig, "SUBMIT", "{}"], "unknown_command"],
      [[sig, "HEARTBEAT", "ping"], "undecodable_body"]
    ]
    cases.each do |frames, code|
      @broker.send_frames(id, frames)
      err = @broker.expect("ERROR")
      assert_equal code, err.body["code"], frames.inspect
      refute_empty err.body["message"]
    end

    step = FakeBroker.step("echo")
    step.delete("inputs")
    @broker.send(id, "STEP", { "steps" => [step] })
    err = @broker.expect("ERROR")
    assert_equal "schema_violation", err.body["code"]
    assert_equal "STEP", err.body["command"]
    assert_equal "/steps/0", err.body["instance_path"]
    assert_equal step["attempt_id"], err.body["attempt_id"]

    # Never an ERROR to an ERROR: a bad ERROR gets no answer, so the next
    # message after a valid STEP is its RESULT.
    @broker.send(id, "ERROR", { "code" => "BAD CODE", "message" => 7 })
    @broker.send_frames(id, [sig, "ERROR", "not json"])
    good = FakeBroker.step("echo")
    @broker.send(id, "STEP", { "steps" => [good] })
    msg = @broker.expect("RESULT")
    assert_equal good["attempt_id"], msg.body["results"][0]["attempt_id"]
  end

  # ------------------------------------------------------------------ close

  def test_graceful_close_hands_back_queued_drains_running_and_waits_for_acks
    started = Queue.new
    release = Queue.new
    pool, thread, id = welcomed_pool(capacity: 1) do |p|
      p.handle("blocker") do |s|
        started << s.attempt_id
        release.pop
        { "done" => true }
      end
    end
    s1 = FakeBroker.step("blocker")
    s2 = FakeBroker.step("blocker")
    @broker.send(id, "STEP", { "steps" => [s1, s2] })
    assert_equal s1["attempt_id"], pop(started)

    closer = Thread.new { pool.close(drain_timeout: WAIT) }
    bye = @broker.expect("DISCONNECT")
    assert_equal [s2["attempt_id"]], bye.body["handed_back"], "the attempt not started is handed back"
    release << :go
    r = @broker.expect_results([s1["attempt_id"]])
    assert_equal({ "done" => true }, r[s1["attempt_id"]]["output"])
    assert thread.alive? || !closer.alive?, "the pool waits for the ACK"
    @broker.ack(id, [s1["attempt_id"]])
    assert closer.join(WAIT), "close returns once the results are acknowledged"
    assert thread.join(WAIT), "run returns after close"
    assert pool.closed?
  end

  def test_close_gives_up_on_a_hung_handler_after_the_drain_timeout
    started = Queue.new
    pool, thread, id = welcomed_pool(capacity: 1) do |p|
      p.handle("hang") do |s|
        started << s.attempt_id
        sleep # ignores cancel
      end
    end
    s1 = FakeBroker.step("hang")
    @broker.send(id, "STEP", { "steps" => [s1] })
    pop(started)
    pool.stop(drain_timeout: 0.2)
    first = @broker.expect("DISCONNECT")
    assert_nil first.body["handed_back"]
    second = @broker.expect("DISCONNECT")
    assert_equal [s1["attempt_id"]], second.body["handed_back"], "handed back at the drain timeout"
    assert thread.join(WAIT)
    assert pool.closed?
  end

  # ------------------------------------------------------------ test pool

  def test_testpool_binary_ready_echo_and_sigterm
    bin = File.expand_path("../bin/stepbroker-testpool", __dir__)
    state = Dir.mktmpdir("stepbroker-rb-")
    out_r, out_w = IO.pipe
    pid = Process.spawn(RbConfig.ruby, bin, "--endpoint", @broker.endpoint, "--handlers", "echo,fail_then_succeed",
                        "--capacity", "2", "--pool-id", "rb-bin-#{SecureRandom.hex(2)}", "--encoding", "msgpack",
                        "--state-dir", state, out: out_w, err: File::NULL)
    out_w.close
    line = Timeout.timeout(WAIT) { out_r.gets }
    assert_match(/\AREADY rb-bin-\h+\n\z/, line)
    hello = @broker.expect("HELLO")
    assert_equal %w[echo fail_then_succeed], hello.body["handlers"]
    assert_equal "msgpack", hello.body["encoding"]
    @broker.welcome(hello.identity, encoding: "msgpack")

    step = FakeBroker.step("echo", inputs: { "a" => { "b" => 1 } }, context: { "c" => 2 }, config: { "d" => 3 })
    @broker.send(hello.identity, "STEP", { "steps" => [step] }, encoding: "msgpack")
    r = @broker.expect_results([step["attempt_id"]])[step["attempt_id"]]
    assert_equal({ "inputs" => { "a" => { "b" => 1 } }, "context" => { "c" => 2 }, "config" => { "d" => 3 }, "lang" => "ruby" },
                 r["output"])
    @broker.ack(hello.identity, [step["attempt_id"]])

    # fail_then_succeed: fails once per step_id (counted in --state-dir), then completes.
    f1 = FakeBroker.step("fail_then_succeed", config: { "failures" => 1 })
    @broker.send(hello.identity, "STEP", { "steps" => [f1] })
    r1 = @broker.expect_results([f1["attempt_id"]])[f1["attempt_id"]]
    assert_equal "error", r1["status"]
    assert_equal true, r1["error"]["retryable"]
    f2 = FakeBroker.step("fail_then_succeed", config: { "failures" => 1 }, step_id: f1["step_id"], attempt: 2)
    @broker.send(hello.identity, "STEP", { "steps" => [f2] })
    r2 = @broker.expect_results([f2["attempt_id"]])[f2["attempt_id"]]
    assert_equal "complete", r2["status"]
    @broker.ack(hello.identity, [f1["attempt_id"], f2["attempt_id"]])

    Process.kill("TERM", pid)
    @broker.expect("DISCONNECT")
    status = Timeout.timeout(WAIT) { Process.wait2(pid)[1] }
    assert status.success?, "exits 0 on SIGTERM (#{status.inspect})"
  ensure
    if pid
      begin
        Process.kill("KILL", pid)
        Process.wait(pid)
      rescue Errno::ESRCH, Errno::ECHILD
        nil
      end
    end
    FileUtils.rm_rf(state) if state
  end
end
