# frozen_string_literal: true

# The stepbroker handler SDK for Ruby: run workflow steps dispatched by a
# stepbroker broker over ZeroMQ. See handlers-ruby/README.md.
#
#   require "stepbroker/handlers"
#   pool = Stepbroker::HandlerPool.new(endpoint: "tcp://127.0.0.1:5555", capacity: 4)
#   pool.handle("greet") { |step| { "hello" => step.context["name"] } }
#   pool.run
require_relative "version"
require_relative "errors"
require_relative "schema"
require_relative "protocol"
require_relative "step"
require_relative "pool"
