# frozen_string_literal: true

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "minitest/autorun"
require "json"
require "set"
require "stepbroker/handlers"

REPO_ROOT = File.expand_path("../..", __dir__) unless defined?(REPO_ROOT)

# STEPBROKER_TEST_WATCHDOG=seconds: print every thread's backtrace when the
# run takes longer (to debug a stuck test).
if (secs = ENV["STEPBROKER_TEST_WATCHDOG"])
  Thread.new do
    sleep Float(secs)
    Thread.list.each do |t|
      warn "--- #{t.inspect}"
      warn((t.backtrace || []).first(25).join("\n"))
    end
  end
end
