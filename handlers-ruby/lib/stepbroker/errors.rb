# frozen_string_literal: true

module Stepbroker
  # Base class of the SDK's own errors.
  class Error < StandardError; end

  # Raise from a handler to fail the step now, whatever attempts are left
  # (RESULT error with retryable: false).
  class PermanentError < Error
    attr_reader :details

    def initialize(message = nil, details: nil)
      super(message)
      @details = details
    end

    def retryable?
      false
    end

    def retry_after_ms
      nil
    end
  end

  # Raise from a handler to fail this attempt and ask for another one,
  # optionally after retry_after_ms (which overrides the broker's backoff).
  # Any other StandardError is retryable too; this one carries the hint.
  class RetryableError < Error
    attr_reader :retry_after_ms, :details

    def initialize(message = nil, retry_after_ms: nil, details: nil)
      super(message)
      @retry_after_ms = retry_after_ms
      @details = details
    end

    def retryable?
      true
    end
  end

  # Raised by Step#check_cancelled! when the broker cancelled the attempt.
  # The result is sent anyway and acknowledged as stale.
  class CancelledError < Error
    attr_reader :reason

    def initialize(reason = nil)
      super("attempt cancelled#{reason ? " (#{reason})" : ''}")
      @reason = reason
    end

    def retryable?
      true
    end
  end

  # Misuse of the SDK (bad arguments, a handler registered twice, ...).
  class ConfigurationError < Error; end
end
