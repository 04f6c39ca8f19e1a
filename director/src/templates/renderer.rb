# bosun's ERB renderer: renders every ERB template of a deploy in one Ruby
# process, with BOSH's template context.
#
# Input (stdin, JSON):
#   {"jobs":   [{"name", "templates": [{"name", "dest", "text"}]}],
#    "groups": [{"job": <index into jobs>, "properties": {...},
#                "links": {"<name>": {"instances": [...], "address", "properties"}},
#                "specs": [<spec of one instance>, ...]}]}
# Output (stdout, JSON):
#   {"groups": [{"instances": [{"files": [{"path", "content"}],
#                               "errors": [{"template", "line", "message"}]}]}]}
# Every template of every instance is rendered; a failing one adds an error
# and the others go on, so a deploy reports all of its problems at once.
# Uses Ruby's standard library only.

require 'erb'
require 'json'
require 'yaml'

Encoding.default_external = Encoding::UTF_8
Encoding.default_internal = Encoding::UTF_8

class Object
  def blank?
    respond_to?(:empty?) ? !!empty? : !self
  end

  def present?
    !blank?
  end
end

class String
  def blank?
    strip.empty?
  end
end

module Bosun
  # A nested hash read by attribute (`spec.networks.default.ip`,
  # `properties.a.b`); missing attributes are nil, as BOSH's OpenStruct.
  class Attributes
    def initialize(hash)
      @hash = hash
    end

    def self.wrap(value)
      case value
      when Hash then new(value)
      when Array then value.map { |v| wrap(v) }
      else value
      end
    end

    def [](key)
      Attributes.wrap(@hash[key.to_s])
    end

    def to_h
      @hash
    end
    alias to_hash to_h

    def each(&block)
      @hash.each(&block)
    end

    def respond_to_missing?(_name, _include_private = false)
      true
    end

    def method_missing(name, *args)
      key = name.to_s
      return super if key.end_with?('=') || !args.empty?

      Attributes.wrap(@hash[key])
    end
  end

  # `if_p(...) do ... end.else do ... end`: the else block runs only when
  # the first block did not.
  class ActiveElse
    def initialize(template)
      @template = template
    end

    def else
      yield
    end

    def else_if_p(*names, &block)
      @template.if_p(*names, &block)
    end
  end

  class InactiveElse
    def else; end

    def else_if_p(*_names)
      InactiveElse.new
    end
  end

  # Looks a dotted name up in a nested hash: [found, value].
  def self.lookup(hash, name)
    value = hash
    name.to_s.split('.').each do |part|
      return [false, nil] unless value.is_a?(Hash) && value.key?(part)

      value = value[part]
    end
    [true, value]
  end

  def self.find_property(hash, names)
    names.each do |n|
      found, value = lookup(hash, n)
      return [true, value] if found && !value.nil?
    end
    [false, nil]
  end

  class UnknownProperty < StandardError; end
  class UnknownLink < StandardError; end

  # `p` and `if_p` over a nested hash of properties, for templates and links.
  module Properties
    def p(*args)
      names = Array(args[0])
      found, value = Bosun.find_property(property_hash, names)
      return value if found
      return args[1] if args.length > 1

      raise UnknownProperty, "Can't find #{property_kind} '#{names.join("', '")}'"
    end

    def if_p(*names)
      values = names.map do |n|
        found, value = Bosun.find_property(property_hash, [n])
        return ActiveElse.new(self) unless found

        value
      end
      yield(*values)
      InactiveElse.new
    end
  end

  # One instance of a consumed link's provider.
  class LinkInstance
    attr_reader :name, :id, :index, :az, :address, :bootstrap

    def initialize(h)
      @name = h['name']
      @id = h['id']
      @index = h['index']
      @az = h['az']
      @address = h['address']
      @bootstrap = h['bootstrap']
    end
  end

  # `link("name")`: the provider's instances, address and properties.
  class Link
    attr_reader :name, :instances, :address, :properties

    def initialize(name, h)
      @name = name
      @instances = (h['instances'] || []).map { |i| LinkInstance.new(i) }
      @address = h['address']
      @properties = h['properties'] || {}
    end

    include Properties

    def property_hash
      @properties
    end

    def property_kind
      "link '#{@name}' property"
    end
  end

  # What a template sees: BOSH's template context.
  class Context
    attr_reader :name, :index, :spec, :raw_properties

    def initialize(properties, spec, links)
      @raw_properties = properties
      @spec = Attributes.wrap(spec)
      @name = spec['job'] && spec['job']['name']
      @index = spec['index']
      @links = links
    end

    def properties
      Attributes.wrap(@raw_properties)
    end

    include Properties

    def property_hash
      @raw_properties
    end

    def property_kind
      'property'
    end

    def link(name)
      data = @links[name.to_s]
      raise UnknownLink, "Can't find link '#{name}'" if data.nil?

      Link.new(name.to_s, data)
    end

    def if_link(name)
      data = @links[name.to_s]
      return ActiveElse.new(self) if data.nil?

      yield Link.new(name.to_s, data)
      InactiveElse.new
    end

    def get_binding
      binding
    end
  end

  # The line of the template a failure points at.
  def self.error_line(err, filename)
    if err.is_a?(SyntaxError)
      m = err.message.match(/#{Regexp.escape(filename)}:(\d+)/)
      return m[1].to_i if m
    end
    (err.backtrace || []).each do |frame|
      next unless frame.start_with?("#{filename}:")

      m = frame[filename.length..].match(/\A:(\d+)/)
      return m[1].to_i if m
    end
    nil
  end

  def self.error_message(err, filename)
    msg = err.message.to_s
    msg = 'abort' if err.is_a?(SystemExit) && (msg.empty? || msg == 'exit')
    if err.is_a?(SyntaxError)
      # "FILE:LINE: message" then the generated code: keep the message.
      first = msg.lines.find { |l| l.include?("#{filename}:") } || msg.lines.first || ''
      msg = first.sub(/\A.*?#{Regexp.escape(filename)}:\d+: /, '').strip
    end
    kind = err.class.name.sub(/\ABosun::/, '')
    kind == 'RuntimeError' || err.is_a?(SystemExit) ? msg : "#{kind}: #{msg}"
  end

  def self.render_group(jobs_compiled, group)
    job = jobs_compiled.fetch(group['job'])
    links = group['links'] || {}
    frozen = Marshal.dump(group['properties'] || {})
    (group['specs'] || []).map do |spec|
      files = []
      errors = []
      job.each do |t|
        ctx = Context.new(Marshal.load(frozen), spec, links)
        begin
          content = eval(t[:src], ctx.get_binding, t[:name], 0)
          files << { 'path' => t[:dest], 'content' => content.to_s }
        rescue SystemExit, StandardError, ScriptError => e
          errors << { 'template' => t[:name], 'line' => error_line(e, t[:name]),
                      'message' => error_message(e, t[:name]) }
        end
      end
      { 'files' => files, 'errors' => errors }
    end
  end

  def self.compile(jobs)
    jobs.map do |j|
      (j['templates'] || []).map do |t|
        erb = ERB.new(t['text'], trim_mode: '-')
        { name: t['name'], dest: t['dest'], src: erb.src }
      end
    end
  end

  def self.main
    input = JSON.parse($stdin.read)
    # Templates that print must not corrupt the answer: fd 1 becomes stderr.
    answer = STDOUT.dup
    STDOUT.reopen(STDERR)
    compiled = compile(input['jobs'] || [])
    groups = (input['groups'] || []).map { |g| { 'instances' => render_group(compiled, g) } }
    out = JSON.generate({ 'groups' => groups })
    answer.write(out)
    answer.flush
  end
end

Bosun.main
