# frozen_string_literal: true

require_relative "test_helper"

# Runs every file in protocol/vectors/ through the SDK's own decoder and
# checks (Stepbroker::Protocol.decode), as PROTOCOL.md "Test vectors" asks:
# valid bodies round-trip in JSON and in MessagePack; invalid ones fail with
# error_code and, for schema_violation, at instance_path with schema_keyword.
class VectorsTest < Minitest::Test
  P = Stepbroker::Protocol
  VECTOR_DIR = ENV.fetch("STEPBROKER_VECTOR_DIR", File.join(REPO_ROOT, "protocol", "vectors"))
  # Commands a pool receives: every framing, encoding, required-field and
  # type vector on these MUST be checked by the SDK.
  POOL_RECEIVES = %w[WELCOME STEP ACK CANCEL HEARTBEAT DISCONNECT ERROR].freeze

  def self.load_cases
    files = Dir[File.join(VECTOR_DIR, "*.json")].sort
    cases = []
    files.each do |file|
      doc = JSON.parse(File.read(file))
      command = doc["command"]
      %w[valid invalid].each do |kind|
        (doc[kind] || []).each_with_index do |v, i|
          cases << { file: File.basename(file), kind: kind, index: i, command: v["command"] || command, vector: v }
        end
      end
    end
    cases
  end

  CASES = load_cases
  REPORT = { covered: [], not_checkable: [] }

  def self.frames_of(vector)
    vector["frames"].map do |f|
      f.key?("hex") ? [f["hex"]].pack("H*") : f["text"].to_s.b
    end
  end

  def schema
    Stepbroker::Schema.default
  end

  def test_vector_files_exist
    refute_empty CASES, "no vectors found in #{VECTOR_DIR}"
    names = Dir[File.join(VECTOR_DIR, "*.json")].map { |f| File.basename(f, ".json").upcase }
    (POOL_RECEIVES + %w[HELLO RESULT PROGRESS]).each do |c|
      assert_includes names, c, "protocol/vectors/ has no file for #{c}"
    end
  end

  # Decode with every command of the protocol accepted (vectors name the
  # command; the accept list of a pool is tested in pool_test.rb).
  def decode(frames, vector)
    P.decode(frames, accept: nil, max_bytes: vector["max_message_bytes"] || P::MAX_MESSAGE_BYTES)
  end

  def check_valid(c)
    v = c[:vector]
    if v["frames"]
      msg = decode(self.class.frames_of(v), v)
      assert_kind_of P::Message, msg, "#{label(c)}: #{msg.respond_to?(:message) ? msg.message : msg}"
      assert_equal c[:command], msg.command, label(c) if c[:command]
      assert json_equal?(v["body"], msg.body), "#{label(c)}: got #{msg.body.inspect}" if v.key?("body")
      return
    end
    encodings.each do |enc|
      frames = P.frames(c[:command], v["body"], enc)
      assert_equal enc, P.sniff(frames[2]), label(c)
      msg = decode(frames, v)
      assert_kind_of P::Message, msg, "#{label(c)} (#{enc}): #{msg.respond_to?(:message) ? msg.message : msg}"
      assert_equal c[:command], msg.command
      assert_equal v["body"], msg.body, "#{label(c)} (#{enc}): value changed in the round trip"
      assert json_equal?(v["body"], msg.body)
    end
  end

  def check_invalid(c)
    v = c[:vector]
    attempts = if v["frames"]
                 [["raw", self.class.frames_of(v)]]
               else
                 encodings.map { |enc| [enc, P.frames(c[:command], v["body"], enc)] }
               end
    attempts.each do |enc, frames|
      fault = decode(frames, v)
      assert_kind_of P::Fault, fault, "#{label(c)} (#{enc}): accepted, expected #{v['error_code']}"
      assert_equal v["error_code"], fault.code, "#{label(c)} (#{enc}): #{fault.message}"
      next unless v["error_code"] == "schema_violation"

      assert_equal v["instance_path"], fault.instance_path, "#{label(c)} (#{enc}): instance_path" if v.key?("instance_path")
      assert_equal v["schema_keyword"], fault.keyword, "#{label(c)} (#{enc}): schema keyword" if v.key?("schema_keyword")
    end
  end

  def encodings
    P.msgpack? ? %w[json msgpack] : %w[json]
  end

  def label(c)
    "#{c[:file]} #{c[:kind]}[#{c[:index]}] #{c[:vector]['name'].inspect}"
  end

  def json_equal?(a, b)
    if a.is_a?(Hash) && b.is_a?(Hash)
      a.size == b.size && a.all? { |k, x| b.key?(k) && json_equal?(x, b[k]) }
    elsif a.is_a?(Array) && b.is_a?(Array)
      a.size == b.size && a.zip(b).all? { |x, y| json_equal?(x, y) }
    elsif a.is_a?(Numeric) && b.is_a?(Numeric)
      a == b
    else
      a.class == b.class && a == b
    end
  end

  # A vector is checkable unless its command's schema uses a keyword the
  # SDK's validator does not implement (none today).
  def checkable?(c)
    return [true, nil] if c[:vector]["frames"] || c[:command].nil?

    missing = schema.unsupported_keywords(c[:command])
    missing.empty? ? [true, nil] : [false, "schema uses #{missing.join(', ')}"]
  end

  CASES.each do |c|
    slug = "#{c[:file]}_#{c[:kind]}_#{c[:index]}_#{c[:vector]['name']}".gsub(/[^A-Za-z0-9]+/, "_")
    define_method("test_vector_#{slug}") do
      ok, why = checkable?(c)
      unless ok
        REPORT[:not_checkable] << [label(c), why]
        skip "#{label(c)}: not checkable: #{why}"
      end
      c[:kind] == "valid" ? check_valid(c) : check_invalid(c)
      REPORT[:covered] << c
    end
  end

  # The minimum the SDK must cover, whatever else is added to the vectors:
  # every framing/encoding vector, and every required-field and type vector
  # on the commands a pool receives.
  def test_minimum_coverage
    must = CASES.select do |c|
      v = c[:vector]
      v["frames"] ||
        (POOL_RECEIVES.include?(c[:command]) &&
          (c[:kind] == "valid" || %w[required type additionalProperties].include?(v["schema_keyword"])))
    end
    refute_empty must
    must.each do |c|
      ok, why = checkable?(c)
      assert ok, "#{label(c)} must be checkable by the SDK (#{why})"
    end
    frames = CASES.count { |c| c[:vector]["frames"] }
    assert_operator frames, :>=, 10, "expected framing/encoding vectors in protocol/vectors/frames.json"
  end

  Minitest.after_run do
    next if CASES.empty? || (REPORT[:covered].empty? && REPORT[:not_checkable].empty?)

    by_file = CASES.group_by { |c| c[:file] }
    covered = REPORT[:covered].map { |c| [c[:file], c[:kind], c[:index]] }.to_set
    lines = by_file.map do |file, cs|
      n = cs.count { |c| covered.include?([c[:file], c[:kind], c[:index]]) }
      format("  %-18s %3d/%-3d checked (valid %d, invalid %d)", file, n, cs.size,
             cs.count { |c| c[:kind] == "valid" }, cs.count { |c| c[:kind] == "invalid" })
    end
    $stdout.puts "\nprotocol vectors (#{VECTOR_DIR}):"
    $stdout.puts lines
    $stdout.puts "  total: #{covered.size}/#{CASES.size} checked by the SDK's own decode+check " \
                 "(#{P.msgpack? ? 'JSON and MessagePack' : 'JSON only: ruby-msgpack missing'})"
    REPORT[:not_checkable].each { |l, why| $stdout.puts "  not checkable: #{l}: #{why}" }
  end
end
