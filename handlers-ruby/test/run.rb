# frozen_string_literal: true

# The one entry point for the Ruby SDK's tests:
#   ruby handlers-ruby/test/run.rb [minitest options, e.g. -v or -n /vector/]
# Exits non-zero when a test fails.
Dir[File.join(__dir__, "*_test.rb")].sort.each { |f| require_relative File.basename(f) }
