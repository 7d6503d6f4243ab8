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

    COMMANDS = %w[HELLO WELCOME STEP RESULT ACK PROGRESS CANCEL HEARTBEAT DISCONNECT ERROR
                  SUBMIT STATUS WAIT CANCEL_TASK POOLS REPLY].freeze
    # What a handler pool accepts from the broker.
    POOL_ACCEPTS = %w[WELCOME STEP ACK CANCEL HEARTBEAT DISCONNECT ERROR].freeze
    # What a pool sends.
    POOL_SENDS = %w[HELLO RESULT PROGRESS HEARTBEAT DISCONNECT ERROR].freeze

    ERROR_CODES = %w[malformed_frame unsupported_version unknown_command undecodable_body
                     schema_violation message_too_large hello_required hello_rejected
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
      value, encoding = decode_body(body)
      return Fault.new(code: "undecodable_body", command: command, message: encoding) if value.nil?

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

    # Returns [value, encoding] or [nil, reason].
    def decode_body(bytes)
      encoding = sniff(bytes)
      return [nil, "The body is neither a JSON object nor a MessagePack map."] unless encoding

      value =
        if encoding == "json"
          text = bytes.dup.force_encoding("UTF-8")
          return [nil, "The JSON body is not valid UTF-8."] unless text.valid_encoding?

          JSON.parse(text)
        else
          return [nil, "The body is MessagePack, which this pool cannot read (install ruby-msgpack)."] unless msgpack?

          MessagePack.unpack(bytes)
        end
      return [nil, "The body is not an object."] unless value.is_a?(Hash)

      problem = json_problem(value, "")
      return [nil, "The #{encoding} body holds a value JSON cannot carry: #{problem}."] if problem

      [value, encoding]
    rescue JSON::ParserError, EncodingError, StandardError => e
      [nil, "The #{encoding} body does not parse (#{e.class.name.split('::').last}: #{e.message[0, 200]})."]
    end

    # A description of the first value that is not plain JSON (binary,
    # non-string keys, NaN, extension types), or nil.
    def json_problem(value, path)
      case value
      when Hash
        value.each do |k, v|
          return "a non-string key at #{path.empty? ? '/' : path}" unless k.is_a?(String)
          return "a key that is not UTF-8 at #{path}" unless utf8?(k)

          p = json_problem(v, "#{path}/#{k}")
          return p if p
        end
        nil
      when Array
        value.each_with_index do |v, i|
          p = json_problem(v, "#{path}/#{i}")
          return p if p
        end
        nil
      when String then utf8?(value) ? nil : "binary or non-UTF-8 text at #{path}"
      when Float then value.finite? ? nil : "a non-finite number at #{path}"
      when Integer, true, false, nil then nil
      else "a #{value.class} at #{path}"
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
