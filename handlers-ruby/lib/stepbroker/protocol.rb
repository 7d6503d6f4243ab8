# frozen_string_literal: true

require "json"
require_relative "schema"

begin
  require "msgpack"
rescue LoadError
  # MessagePack is optional: without it the pool speaks JSON only, and a
  # MessagePack body is answered with ERROR undecodable_body.
end

module Stepbroker
  # The wire protocol of protocol/PROTOCOL.md, version 1: framing, the two body
  # encodings and the checks a receiver runs on every message. Nothing here
  # touches a socket.
  module Protocol
    NAME = "stepbroker"
    VERSION = 1
    SIGNATURE = "#{NAME}/#{VERSION}".b.freeze

    HEARTBEAT_INTERVAL_MS = 1000
    HEARTBEAT_LIVENESS = 3
    MAX_MESSAGE_BYTES = 1024 * 1024
    HARD_LIMIT_FACTOR = 16
    MAX_BATCH = 64
    # A body nests at most this many levels (its own object is level 1), in both encodings.
    MAX_DEPTH = 64
    # An output, usage, context or error details of its own nests at most this many levels (protocol/constants.ts).
    MAX_VALUE_DEPTH = 56

    COMMANDS = %w[HELLO WELCOME STEP RESULT ACK PROGRESS CANCEL HEARTBEAT DISCONNECT ERROR
                  SUBMIT STATUS WAIT CANCEL_TASK POOLS HISTORY REPLY].freeze
    # What a handler pool accepts from the broker.
    POOL_ACCEPTS = %w[WELCOME STEP ACK CANCEL HEARTBEAT DISCONNECT ERROR].freeze
    # What a pool sends.
    POOL_SENDS = %w[HELLO RESULT PROGRESS HEARTBEAT DISCONNECT ERROR].freeze

    ERROR_CODES = %w[malformed_frame unsupported_version unknown_command undecodable_body
                     schema_violation message_too_large unstorable_value too_deep hello_required hello_rejected
                     identity_mismatch session_mismatch not_your_attempt
                     unknown_attempt stale_attempt unknown_task unknown_template invalid_request
                     forbidden too_many_errors over_budget reply_too_large shutting_down internal_error].freeze

    ENCODINGS = %w[json msgpack].freeze

    # Error types the protocol reserves for step_error.type (protocol/schemas/common.json,
    # $defs/reserved_error_type): every SDK writes these same strings for these cases.
    UNKNOWN_HANDLER = "unknown_handler"
    OUTPUT_TOO_LARGE = "output_too_large"
    INVALID_OUTPUT = "invalid_output"
    INVALID_RESULT = "invalid_result"
    POOL_ERROR_TYPES = [UNKNOWN_HANDLER, OUTPUT_TOO_LARGE, INVALID_OUTPUT, INVALID_RESULT].freeze

    # A decoded, checked message.
    Message = Struct.new(:command, :body, :encoding)

    # Why a message was refused; becomes an ERROR body.
    Fault = Struct.new(:code, :message, :command, :schema_path, :instance_path, :keyword, :attempt_id,
                       keyword_init: true) do
      def to_error_body
        body = { "code" => code, "message" => message.to_s[0, 8192] }
        body["command"] = command[0, 64] if command
        body["schema_path"] = schema_path[0, 1024] if schema_path
        body["instance_path"] = instance_path[0, 1024] if instance_path
        body["attempt_id"] = attempt_id if attempt_id
        body
      end
    end

    class EncodeError < StandardError; end

    module_function

    def msgpack?
      defined?(::MessagePack) ? true : false
    end

    # Which encoding a body uses, from its first significant byte, or nil.
    def sniff(bytes)
      bytes.each_byte.with_index do |b, i|
        next if [0x20, 0x09, 0x0a, 0x0d].include?(b)
        return "json" if b == 0x7b
        return "msgpack" if i.zero? && ((0x80..0x8f).cover?(b) || b == 0xde || b == 0xdf)

        return nil
      end
      nil
    end

    # Encodes a body (a Hash with String keys) in "json" or "msgpack".
    def encode_body(body, encoding = "json")
      if encoding.to_s == "msgpack"
        raise EncodeError, "msgpack is not installed (apt-get install ruby-msgpack)" unless msgpack?

        MessagePack.pack(body).b
      else
        JSON.generate(body).b
      end
    rescue JSON::GeneratorError, NoMethodError, ArgumentError, RangeError => e
      raise EncodeError, "#{e.class}: #{e.message}"
    end

    # The three frames of a message.
    def frames(command, body, encoding = "json")
      [SIGNATURE, command.to_s.b, encode_body(body, encoding)]
    end

    # Decodes and checks a message given as its frames (without the routing
    # id). Returns a Message, or a Fault saying which error to answer with.
    #   accept:    commands this receiver accepts (others: unknown_command);
    #              nil accepts every command of the protocol
    #   max_bytes: body size limit (message_too_large)
    #   schema:    the validator (Schema.default)
    def decode(frames, accept: nil, max_bytes: MAX_MESSAGE_BYTES, schema: Schema.default)
      unless frames.is_a?(Array) && frames.size == 3
        n = frames.respond_to?(:size) ? frames.size : 0
        return Fault.new(code: "malformed_frame",
                         message: "Expected 3 frames [signature, command, body], got #{n}. Send exactly three frames.")
      end
      sig, cmd, body = frames.map { |f| f.to_s.b }
      if sig != SIGNATURE
        text = sig[0, 40].force_encoding("ISO-8859-1").encode("UTF-8")
        if sig.start_with?("#{NAME}/".b)
          return Fault.new(code: "unsupported_version",
                           message: "Signature frame is #{text.inspect}, expected #{SIGNATURE.inspect}. Upgrade the SDK or the broker.")
        end
        return Fault.new(code: "malformed_frame",
                         message: "Signature frame is #{text.inspect}, expected #{SIGNATURE.inspect}.")
      end
      command = cmd.dup.force_encoding("UTF-8")
      printable = command.valid_encoding? && command.match?(/\A[\x20-\x7e]{1,64}\z/) ? command : nil
      unless COMMANDS.include?(command) && (accept.nil? || accept.include?(command))
        return Fault.new(code: "unknown_command",
                         message: "Command #{(printable || cmd[0, 64].inspect).inspect} is not accepted here.",
                         command: printable)
      end
      if body.bytesize > max_bytes
        return Fault.new(code: "message_too_large", command: command,
                         message: "The #{command} body is #{body.bytesize} bytes; the limit is #{max_bytes}.")
      end
      value, encoding, code, path = decode_body(body)
      if value.nil?
        return Fault.new(code: code || "undecodable_body", command: command, message: encoding,
                         instance_path: path)
      end

      failure = schema.validate(command, value)
      if failure
        return Fault.new(code: "schema_violation", command: command,
                         message: "#{command} body: #{failure.instance_path.empty? ? '(body)' : failure.instance_path} " \
                                  "#{failure.message}. Fix the named field.",
                         schema_path: failure.schema_path, instance_path: failure.instance_path,
                         keyword: failure.keyword, attempt_id: attempt_id_near(value, failure.instance_path))
      end
      Message.new(command, value, encoding)
    end

    # Returns [value, encoding] or [nil, reason, code, instance_path] (code nil: undecodable_body).
    def decode_body(bytes)
      encoding = sniff(bytes)
      return [nil, "The body is neither a JSON object nor a MessagePack map."] unless encoding

      value =
        if encoding == "json"
          text = bytes.dup.force_encoding("UTF-8")
          return [nil, "The JSON body is not valid UTF-8."] unless text.valid_encoding?

          # Before parsing: the parser would recurse into deep nesting, and refuses a lone
          # surrogate escape as a syntax error, where the protocol says unstorable_value.
          problem = json_prescan(bytes.b)
          return problem if problem

          JSON.parse(text, max_nesting: false)
        else
          return [nil, "The body is MessagePack, which this pool cannot read (install ruby-msgpack)."] unless msgpack?

          MessagePack.unpack(bytes)
        end
      return [nil, "The body is not an object."] unless value.is_a?(Hash)

      problem = json_problem(value, [], 1)
      return problem if problem.is_a?(Array)
      return [nil, "The #{encoding} body holds a value JSON cannot carry: #{problem}."] if problem

      [value, encoding]
    rescue JSON::ParserError, EncodingError, StandardError => e
      # msgpack-ruby stops at 128 levels by itself; anything that deep is over MAX_DEPTH too.
      if defined?(::MessagePack::StackError) && e.is_a?(::MessagePack::StackError)
        return [nil, "The msgpack body nests deeper than #{MAX_DEPTH} levels.", "too_deep", ""]
      end

      [nil, "The #{encoding} body does not parse (#{e.class.name.split('::').last}: #{e.message[0, 200]})."]
    end

    JSON_SPECIAL = /["\\\[\]{}]/n.freeze

    # Counts [ and { outside strings up to the first excess over MAX_DEPTH, and finds \uD800-\uDFFF
    # escapes without their pair. nil, or the [nil, reason, code, path] of decode_body.
    def json_prescan(bytes)
      depth = 0
      in_str = false
      i = 0
      while (i = bytes.index(JSON_SPECIAL, i))
        c = bytes.getbyte(i)
        if in_str
          if c == 0x5c
            if bytes.getbyte(i + 1) == 0x75
              u = bytes.byteslice(i + 2, 4).to_i(16)
              if u.between?(0xd800, 0xdbff) && bytes.byteslice(i + 6, 2) == "\\u" &&
                 bytes.byteslice(i + 8, 4).to_i(16).between?(0xdc00, 0xdfff)
                i += 12
                next
              end
              if u.between?(0xd800, 0xdfff)
                return [nil, "The JSON body holds an unpaired surrogate escape (at byte #{i}), which PostgreSQL " \
                             "cannot store.", "unstorable_value", nil]
              end
              i += 6
            else
              i += 2
            end
            next
          end
          in_str = false if c == 0x22
        elsif c == 0x22
          in_str = true
        elsif c == 0x7b || c == 0x5b
          depth += 1
          if depth > MAX_DEPTH
            return [nil, "The JSON body nests deeper than #{MAX_DEPTH} levels (level #{MAX_DEPTH + 1} opens at " \
                         "byte #{i}).", "too_deep", ""]
          end
        elsif c == 0x7d || c == 0x5d
          depth -= 1
        end
        i += 1
      end
      nil
    end

    # JSON Pointer text that is itself storable: U+0000 and lone surrogates as \uXXXX text.
    def storable_pointer(path)
      path.map { |k| "/" + k.to_s.gsub("~", "~0").gsub("/", "~1").gsub("\0", "\\u0000") }.join
    end

    def unstorable(path, what)
      where = storable_pointer(path)
      [nil, "#{where}: #{what}, which PostgreSQL cannot store.", "unstorable_value", where]
    end

    # A String (the reason) for values JSON cannot carry, an Array (decode_body's failure) for
    # values PostgreSQL cannot store or nesting over MAX_DEPTH, or nil.
    def json_problem(value, path, depth)
      case value
      when Hash, Array
        return [nil, "The body nests deeper than #{MAX_DEPTH} levels.", "too_deep", ""] if depth > MAX_DEPTH

        if value.is_a?(Hash)
          value.each do |k, v|
            return "a non-string key at #{path.empty? ? '/' : storable_pointer(path)}" unless k.is_a?(String)
            return "a key that is not UTF-8 at #{storable_pointer(path)}" unless utf8?(k)
            return unstorable(path + [k], "an object key holds U+0000") if k.include?("\0")

            p = json_problem(v, path + [k], depth + 1)
            return p if p
          end
        else
          value.each_with_index do |v, i|
            p = json_problem(v, path + [i], depth + 1)
            return p if p
          end
        end
        nil
      when String
        return "binary or non-UTF-8 text at #{storable_pointer(path)}" unless utf8?(value)

        value.include?("\0") ? unstorable(path, "a string holds U+0000") : nil
      when Float then value.finite? ? nil : "a non-finite number at #{storable_pointer(path)}"
      when Integer, true, false, nil then nil
      else "a #{value.class} at #{storable_pointer(path)}"
      end
    end

    def utf8?(s)
      s.encoding == Encoding::UTF_8 && s.valid_encoding?
    end

    ID_RE = /\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\z/.freeze

    # The attempt_id of the item a failing instance path points into
    # (/steps/3/..., /acks/0/...), when that item has a valid one.
    def attempt_id_near(body, instance_path)
      m = instance_path.to_s.match(%r{\A/([a-z_]+)/(\d+)})
      return nil unless m

      list = body[m[1]]
      item = list.is_a?(Array) ? list[m[2].to_i] : nil
      id = item.is_a?(Hash) ? item["attempt_id"] : nil
      id.is_a?(String) && ID_RE.match?(id) ? id : nil
    end
  end
end
