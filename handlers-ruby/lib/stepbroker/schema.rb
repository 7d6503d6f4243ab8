# frozen_string_literal: true

require "json"

module Stepbroker
  # A small JSON Schema (draft 2020-12) validator for the keywords the protocol
  # schemas use. Debian's ruby-json-schema (2.8) stops at draft 6, so the SDK
  # carries its own: it walks the schema files in protocol/schemas/ (a copy is
  # bundled in lib/stepbroker/schemas/) and reports the first failure the way
  # Ajv does with allErrors: false — keyword, instance path (JSON Pointer) and
  # schema path — so test vectors written against Ajv check out here too.
  #
  # Supported: type, enum, const, $ref (absolute URNs and local pointers),
  # properties, required, additionalProperties, items, prefixItems, minItems,
  # maxItems, uniqueItems, minLength, maxLength, pattern, minimum, maximum,
  # exclusiveMinimum, exclusiveMaximum, multipleOf, minProperties,
  # maxProperties, allOf, anyOf, oneOf, not, if/then/else, boolean schemas.
  # Annotations (title, description, $comment, format, ...) are ignored. A
  # schema using any other keyword is reported by #unsupported_keywords.
  class Schema
    Failure = Struct.new(:keyword, :instance_path, :schema_path, :message, keyword_init: true)

    ANNOTATIONS = %w[$schema $id $defs $comment title description default examples deprecated
                     readOnly writeOnly format contentMediaType contentEncoding].freeze
    UNTYPED = %w[$ref const enum not anyOf oneOf allOf if then else].freeze
    GROUPS = {
      "number" => %w[maximum minimum exclusiveMaximum exclusiveMinimum multipleOf],
      "string" => %w[maxLength minLength pattern],
      "array" => %w[maxItems minItems uniqueItems prefixItems items],
      "object" => %w[maxProperties minProperties required additionalProperties properties]
    }.freeze
    SUPPORTED = (ANNOTATIONS + UNTYPED + GROUPS.values.flatten + ["type"]).freeze
    ID_PREFIX = "urn:stepbroker:1:"

    DEFAULT_DIR = File.expand_path("schemas", __dir__)

    # The validator for the bundled schemas (or STEPBROKER_SCHEMA_DIR), built once.
    def self.default
      @default ||= new(ENV.fetch("STEPBROKER_SCHEMA_DIR", DEFAULT_DIR))
    end

    attr_reader :dir

    def initialize(dir)
      @dir = dir
      @docs = {}
      Dir[File.join(dir, "*.json")].sort.each do |file|
        doc = JSON.parse(File.read(file))
        @docs[doc["$id"] || "#{ID_PREFIX}#{File.basename(file, '.json')}"] = doc
      end
      raise ArgumentError, "no schemas in #{dir}" if @docs.empty?

      @regexps = {}
      @refs = {}
      @meta = {}.compare_by_identity
    end

    # Schema id for a command name: CANCEL_TASK -> urn:stepbroker:1:cancel_task.
    def self.id_for(command)
      "#{ID_PREFIX}#{command.downcase}"
    end

    def known?(command)
      @docs.key?(self.class.id_for(command))
    end

    # Keywords used anywhere in the command's schema (and what it references)
    # that this validator does not implement.
    def unsupported_keywords(command)
      found = []
      seen = {}
      walk = lambda do |schema, base|
        next unless schema.is_a?(Hash)
        next if seen[schema.object_id]

        seen[schema.object_id] = true
        schema.each_key { |k| found << k unless SUPPORTED.include?(k) }
        %w[properties $defs].each { |k| schema[k]&.each_value { |s| walk.call(s, base) } }
        %w[allOf anyOf oneOf prefixItems].each { |k| schema[k]&.each { |s| walk.call(s, base) } }
        %w[items not if then else additionalProperties].each { |k| walk.call(schema[k], base) }
        if schema["$ref"]
          target, tbase = resolve(schema["$ref"], base)
          walk.call(target, tbase)
        end
      end
      id = self.class.id_for(command)
      walk.call(@docs.fetch(id), id)
      found.uniq
    end

    # Validates +value+ against the schema of +command+. Returns nil when it
    # is valid, otherwise the first Failure (as Ajv would report it).
    def validate(command, value)
      id = self.class.id_for(command)
      doc = @docs[id] or raise ArgumentError, "no schema for #{command}"
      # Fast pass without paths; only a failing body pays for the second,
      # path-tracking pass that says where it fails.
      return nil if check(doc, id, nil, value, nil, [])

      errors = []
      check(doc, id, "#", value, "", errors)
      errors.find { |e| e.keyword != "if" } || errors.first ||
        Failure.new(keyword: "unknown", instance_path: "", schema_path: "#", message: "is invalid")
    end

    private

    def resolve(ref, base)
      key = [ref, base]
      return @refs[key] if @refs.key?(key)

      uri, pointer = ref.split("#", 2)
      doc_id = uri.nil? || uri.empty? ? base : uri
      doc = @docs[doc_id] or raise ArgumentError, "unresolvable $ref #{ref}"
      target = doc
      (pointer || "").split("/").drop(1).each do |tok|
        tok = tok.gsub("~1", "/").gsub("~0", "~")
        target = target.is_a?(Array) ? target[Integer(tok)] : target.fetch(tok)
      end
      @refs[key] = [target, doc_id]
    end

    # Paths are nil in the fast pass.
    def ptr(path, token)
      return nil unless path

      t = token.to_s
      t = t.gsub("~", "~0").gsub("/", "~1") if t.include?("~") || t.include?("/")
      "#{path}/#{t}"
    end

    def sub(sp, suffix)
      sp && "#{sp}/#{suffix}"
    end

    def fail!(errors, keyword, ip, sp, message)
      errors << Failure.new(keyword: keyword, instance_path: ip, schema_path: sub(sp, keyword), message: message)
      false
    end

    # Per schema node, computed once: [types, deferred type, untyped keywords
    # present, [[group, keywords present], ...]].
    def meta(schema)
      @meta[schema] ||= begin
        types = schema["type"]
        types = [types] if types.is_a?(String)
        deferred = nil
        if types && types.size == 1 && GROUPS[types[0]] && GROUPS[types[0]].any? { |k| schema.key?(k) }
          deferred = types[0]
        end
        groups = GROUPS.map { |name, kws| [name, kws.select { |k| schema.key?(k) }] }.reject { |_, u| u.empty? }
        [types, deferred, UNTYPED.select { |k| schema.key?(k) }, groups].freeze
      end
    end

    def json_type(value)
      case value
      when Hash then "object"
      when Array then "array"
      when String then "string"
      when Integer then "integer"
      when Float then value.finite? && value == value.floor ? "integer" : "number"
      when true, false then "boolean"
      when nil then "null"
      else "unknown"
      end
    end

    def type_ok?(type, value)
      actual = json_type(value)
      type == actual || (type == "number" && actual == "integer")
    end

    def group_of(value)
      case value
      when Hash then "object"
      when Array then "array"
      when String then "string"
      when Integer, Float then "number"
      end
    end

    # JSON equality: 1 == 1.0, objects by key set.
    def json_equal?(a, b)
      if a.is_a?(Hash) && b.is_a?(Hash)
        a.size == b.size && a.all? { |k, v| b.key?(k) && json_equal?(v, b[k]) }
      elsif a.is_a?(Array) && b.is_a?(Array)
        a.size == b.size && a.each_index.all? { |i| json_equal?(a[i], b[i]) }
      elsif a.is_a?(Numeric) && b.is_a?(Numeric)
        a == b
      else
        a.class == b.class && a == b
      end
    end

    # ECMAScript pattern -> Ruby Regexp: ^ and $ anchor the whole string in JS
    # (no multiline flag), while in Ruby they anchor lines.
    def regexp(pattern)
      @regexps[pattern] ||= begin
        out = +""
        in_class = false
        i = 0
        while i < pattern.length
          c = pattern[i]
          if c == "\\"
            out << c << pattern[i + 1].to_s
            i += 2
            next
          end
          if in_class
            in_class = false if c == "]"
            out << c
          elsif c == "["
            in_class = true
            out << c
          elsif c == "^"
            out << "\\A"
          elsif c == "$"
            out << "\\z"
          else
            out << c
          end
          i += 1
        end
        Regexp.new(out)
      end
    end

    # Returns true when valid; on failure appends Failures to +errors+ and
    # returns false. Keyword order follows Ajv: a type check up front unless
    # it is deferred to its keyword group, then the untyped keywords, then the
    # number, string, array and object groups.
    def check(schema, base, sp, value, ip, errors)
      return true if schema == true
      return fail!(errors, "false schema", ip, sp, "boolean schema is false") if schema == false

      types, deferred, untyped, groups = meta(schema)
      if types && !deferred && !types.any? { |t| type_ok?(t, value) }
        return fail!(errors, "type", ip, sp, "must be #{types.join(',')}")
      end

      untyped.each do |kw|
        return false unless check_untyped(kw, schema, base, sp, value, ip, errors)
      end

      group = group_of(value)
      groups.each do |name, used|
        if group != name
          return fail!(errors, "type", ip, sp, "must be #{deferred}") if deferred == name

          next
        end
        if deferred && !type_ok?(deferred, value)
          return fail!(errors, "type", ip, sp, "must be #{deferred}")
        end

        used.each do |kw|
          return false unless send(:"check_#{name}", kw, schema, base, sp, value, ip, errors)
        end
      end
      true
    end

    def check_untyped(kw, schema, base, sp, value, ip, errors)
      arg = schema[kw]
      case kw
      when "$ref"
        target, tbase = resolve(arg, base)
        tsp = sp && (arg.start_with?("#") ? "#{base}#{arg}" : arg)
        check(target, tbase, tsp, value, ip, errors)
      when "const"
        json_equal?(arg, value) || fail!(errors, "const", ip, sp, "must be equal to constant")
      when "enum"
        arg.any? { |e| json_equal?(e, value) } || fail!(errors, "enum", ip, sp, "must be one of #{arg.inspect}")
      when "not"
        !check(arg, base, sub(sp, "not"), value, ip, []) || fail!(errors, "not", ip, sp, "must NOT be valid")
      when "anyOf", "oneOf"
        branch_errors = []
        passed = arg.each_with_index.count do |sch, i|
          check(sch, base, sub(sp, "#{kw}/#{i}"), value, ip, branch_errors)
        end
        return true if kw == "anyOf" ? passed.positive? : passed == 1

        errors.concat(branch_errors) if passed.zero?
        fail!(errors, kw, ip, sp, "must match #{kw == 'anyOf' ? 'a schema in anyOf' : 'exactly one schema in oneOf'}")
      when "allOf"
        arg.each_with_index.all? { |sch, i| check(sch, base, sub(sp, "allOf/#{i}"), value, ip, errors) }
      when "if"
        branch = check(arg, base, sub(sp, "if"), value, ip, []) ? "then" : "else"
        return true unless schema.key?(branch)
        return true if check(schema[branch], base, sub(sp, branch), value, ip, errors)

        fail!(errors, "if", ip, sp, "must match \"#{branch}\" schema")
      else # then / else are evaluated with if
        true
      end
    end

    def check_number(kw, schema, _base, sp, value, ip, errors)
      limit = schema[kw]
      ok = case kw
           when "maximum" then value <= limit
           when "minimum" then value >= limit
           when "exclusiveMaximum" then value < limit
           when "exclusiveMinimum" then value > limit
           when "multipleOf" then (value / limit.to_f) == (value / limit.to_f).floor
           end
      ok || fail!(errors, kw, ip, sp, "must be #{kw} #{limit}")
    end

    def check_string(kw, schema, _base, sp, value, ip, errors)
      limit = schema[kw]
      ok = case kw
           when "maxLength" then value.length <= limit
           when "minLength" then value.length >= limit
           when "pattern" then regexp(limit).match?(value)
           end
      ok || fail!(errors, kw, ip, sp, kw == "pattern" ? "must match pattern \"#{limit}\"" : "must satisfy #{kw} #{limit}")
    end

    def check_array(kw, schema, base, sp, value, ip, errors)
      arg = schema[kw]
      case kw
      when "maxItems" then value.size <= arg || fail!(errors, kw, ip, sp, "must NOT have more than #{arg} items")
      when "minItems" then value.size >= arg || fail!(errors, kw, ip, sp, "must NOT have fewer than #{arg} items")
      when "uniqueItems"
        return true unless arg

        value.each_with_index do |a, i|
          value.each_with_index do |b, j|
            next unless j > i
            return fail!(errors, kw, ip, sp, "must NOT have duplicate items (items #{i} and #{j})") if json_equal?(a, b)
          end
        end
        true
      when "prefixItems"
        arg.each_with_index.all? do |sch, i|
          i >= value.size || check(sch, base, sub(sp, "prefixItems/#{i}"), value[i], ptr(ip, i), errors)
        end
      when "items"
        start = schema["prefixItems"] ? schema["prefixItems"].size : 0
        (start...value.size).all? { |i| check(arg, base, sub(sp, "items"), value[i], ptr(ip, i), errors) }
      end
    end

    def check_object(kw, schema, base, sp, value, ip, errors)
      arg = schema[kw]
      case kw
      when "maxProperties" then value.size <= arg || fail!(errors, kw, ip, sp, "must NOT have more than #{arg} properties")
      when "minProperties" then value.size >= arg || fail!(errors, kw, ip, sp, "must NOT have fewer than #{arg} properties")
      when "required"
        missing = arg.find { |k| !value.key?(k) }
        missing.nil? || fail!(errors, kw, ip, sp, "must have required property '#{missing}'")
      when "additionalProperties"
        props = schema["properties"] || {}
        value.each do |k, v|
          next if props.key?(k)
          return fail!(errors, kw, ip, sp, "must NOT have additional property '#{k}'") if arg == false
          return false unless check(arg, base, sub(sp, "additionalProperties"), v, ptr(ip, k), errors)
        end
        true
      when "properties"
        arg.all? do |k, sch|
          !value.key?(k) || check(sch, base, sub(sp, "properties/#{k}"), value[k], ptr(ip, k), errors)
        end
      end
    end
  end
end
