#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Every directive and variable the module declares has its entry in docs/:
# a "### name" section in directives.md or variables.md.  The minimal
# configuration of README.md, taken from README.md itself, fits where the
# README says to put it: a file of conf.d/, included inside the http block
# of a Debian-style nginx.conf next to Debian's default site; nginx -t
# accepts it and requests for its server name reach it.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $top = "$FindBin::Bin/..";

sub slurp {
    my ($path) = @_;
    open my $fh, '<', $path or die "$path: $!";
    local $/;
    return scalar <$fh>;
}

my %names;
for my $file (glob "$top/module/*.c") {
    my $src = slurp($file);
    $names{$1} = 1 while $src =~ /ngx_string\("(civicgate_[a-z0-9_]+)"\)/g;
}

ok(scalar(keys %names) > 20, 'directives and variables found in module/');

my $docs = slurp("$top/docs/directives.md") . slurp("$top/docs/variables.md");

for my $name (sort keys %names) {
    like($docs, qr/^###\s+\$?\Q$name\E\s*$/m, "$name is documented");
}

# docs/endpoints.md counts the endpoint directives of its table
{
    my $text = slurp("$top/docs/endpoints.md");
    my %n = (two => 2, three => 3, four => 4, five => 5, six => 6,
        seven => 7, eight => 8);
    my ($word) = $text =~ /^(\w+) directives turn a location into an/m;
    my @rows = $text =~ /^\| \[(civicgate_\w+)\]\(directives\.md/mg;
    is($n{ lc($word // '') }, scalar(@rows),
        'endpoints.md: "' . ($word // '?') . ' directives", '
        . scalar(@rows) . ' in its table');
}

# examples/README.md describes the examples as they are
{
    my $text = slurp("$top/examples/README.md");
    for my $file (glob "$top/examples/*.conf") {
        next unless slurp($file) =~ /^\s*civicgate_status;/m;
        my $name = $file =~ s{.*/}{}r;
        my ($row) = $text =~ /^(\| \[\Q$name\E\].*)$/m;
        like($row // '', qr/status endpoint/,
            "examples/README.md: $name serves the status endpoint");
        unlike($row // '', qr/\bwill\b/,
            "examples/README.md: $name, nothing said to come later");
    }
}

###########################################################################
# README.md's minimal configuration, as /etc/nginx/conf.d/civicgate.conf

my $readme = slurp("$top/README.md");
my $where = '/etc/nginx/conf.d/civicgate.conf';
my ($snippet) = $readme =~ /\Q$where\E.*?^```nginx\n(.*?)^```$/ms;
ok(defined $snippet, "README.md has a configuration for $where")
    or do { done_testing; exit };

my $t = Civicgate::Test->new(redis => 0);
my $dir = $t->testdir;
my ($host) = $snippet =~ /^\s*server_name\s+([^\s;]+)/m;
ok(defined $host, 'the server has a name (the default site takes the rest)')
    or $host = 'localhost';

# production paths and ports into the test directory; a Redis port nothing
# listens on
my $conf = $snippet;
is($conf =~ s{(?<=\s)/etc/civicgate/}{$dir/etc/civicgate/}g, 1,
    'the key file is /etc/civicgate/keys');
$conf =~ s{^(\s*listen\s+)80;}{${1}127.0.0.1:%%PORT_0%%;}m
    or fail('the server listens on port 80');
$conf =~ s{redis://127\.0\.0\.1:6379}{redis://127.0.0.1:%%PORT_noredis%%}
    or fail('Redis on 127.0.0.1:6379');
$t->write_file_expand('conf.d/civicgate.conf', $conf);

$t->write_file('etc/civicgate/keys',
    "# journey-ID keys, newest first\n"
    . '2026-06 ' . random_key_hex(32) . "\n"
    . "# pseudonym key, never moved to the top\n"
    . 'citizens-1 ' . random_key_hex(32) . "\n", 0600);

# Debian's default site: listen 80 default_server
$t->write_file_expand('sites-enabled/default', <<'EOF');
server {
    listen 127.0.0.1:%%PORT_0%% default_server;
    location / { return 200 "default site\n"; }
}
EOF

# as Debian's nginx.conf: the module loaded at the top (modules-enabled),
# then conf.d/*.conf and sites-enabled/* inside http
$t->write_nginx_conf(<<'EOF');
    include %%TESTDIR%%/conf.d/*.conf;
    include %%TESTDIR%%/sites-enabled/*;
EOF

my ($rc, $out) = $t->test_config;
is($rc, 0, "nginx -t accepts the README's configuration in conf.d/")
    or diag($out);

SKIP: {
    skip 'nginx -t failed', 3 if $rc;
    $t->run;

    my $r = $t->request('/healthz', host => $host);
    like($r->status, qr/^(200|503)$/,
        "GET /healthz for $host: civicgate_health");
    unlike($r->body, qr/default site/, "$host is not the default site");
    is($t->request('/', host => 'other.example')->body, "default site\n",
        'other names: the default site');
}

$t->done_testing;
