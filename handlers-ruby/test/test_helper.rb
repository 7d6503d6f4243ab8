# frozen_string_literal: true

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "minitest/autorun"
require "json"
require "set"
require "stepbroker/handlers"

REPO_ROOT = File.expand_path("../..", __dir__) unless defined?(REPO_ROOT)
