# frozen_string_literal: true

module Stepbroker
  VERSION = "0.1.0"
end
