#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# "return" answers in the rewrite phase, before consent is checked in the
# precontent phase: where civicgate_consent applies (set in the location,
# inherited from the server, or around an "if" block), a "return" makes
# "nginx -t" fail with a message that says why and names the location and
# the civicgate_consent line.  "civicgate_consent off" next to the return,
# or a return where no consent applies, passes; so does "rewrite ... last",
# whose target location is checked.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

my $HEAD = <<'EOF';
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
    }
EOF

sub server {
    my ($body, $srv) = @_;
    $srv //= '';
    return $HEAD . <<"EOF";
    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        civicgate_citizen \$http_x_citizen_id;
$srv
$body
        location /backend/ {
            civicgate_consent off;
            return 200 "backend\\n";
        }
    }
EOF
}

my @bad = (
    {
        name => 'return in a location with civicgate_consent',
        http => server(<<'EOF'),
        location /svc/ {
            civicgate_consent health;
            return 302 http://127.0.0.1:%%PORT_0%%/backend/;
        }
EOF
        like => qr{"return" in location "/svc/" answers before the "civicgate_consent" of \S+nginx\.conf:(\d+) is checked: set "civicgate_consent off" there or move the "return"},
        line => qr/civicgate_consent health;/,
    },
    {
        name => 'return in a location inheriting civicgate_consent',
        http => server(<<'EOF', '        civicgate_consent health;'),
        location /svc/ {
            return 200 "data\n";
        }
EOF
        like => qr{"return" in location "/svc/" answers before the "civicgate_consent" of \S+nginx\.conf:(\d+)},
        line => qr/civicgate_consent health;/,
    },
    {
        name => 'return in an if block of a location with civicgate_consent',
        http => server(<<'EOF'),
        location /svc/ {
            civicgate_consent health;
            if ($arg_fast) {
                return 200 "data\n";
            }
            proxy_pass http://127.0.0.1:%%PORT_0%%/backend/;
        }
EOF
        like => qr{"return" in location "/svc/" answers before},
        line => qr/civicgate_consent health;/,
    },
    {
        name => 'return at the server level with civicgate_consent there',
        http => server('', "        civicgate_consent health;\n"
                          . "        return 200 \"data\\n\";"),
        like => qr{"return" in server "" answers before},
        line => qr/civicgate_consent health;/,
    },
);

my @good = (
    {
        name => 'civicgate_consent off next to the return',
        http => server(<<'EOF', '        civicgate_consent health;'),
        location = /ping {
            civicgate_consent off;
            return 200 "pong\n";
        }
        location /svc/ {
            proxy_pass http://127.0.0.1:%%PORT_0%%/backend/;
        }
EOF
    },
    {
        name => 'rewrite ... last to a location that checks',
        http => server(<<'EOF'),
        location /old/ {
            civicgate_consent health;
            rewrite ^/old/(.*)$ /svc/$1 last;
        }
        location /svc/ {
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_0%%/backend/;
        }
EOF
    },
    {
        name => 'set and if without return in a location with consent',
        http => server(<<'EOF'),
        location /svc/ {
            civicgate_consent health;
            set $x 1;
            if ($arg_x) {
                set $x 2;
            }
            proxy_pass http://127.0.0.1:%%PORT_0%%/backend/;
        }
EOF
    },
);

my $k = 0;
for my $c (@bad) {
    my $i = $t->nginx('b' . ++$k);
    $i->write_nginx_conf($c->{http});
    my ($rc, $out) = $i->test_config;
    my $name = $c->{name};
    isnt($rc, 0, "$name: nginx -t fails") or next;
    like($out, qr/\[emerg\]/, "$name: [emerg]");
    like($out, $c->{like}, "$name: message") or diag $out;
    my @all = split /\n/, $i->read_file('nginx.conf'), -1;
    my @lines = grep { $all[$_ - 1] =~ $c->{line} } 1 .. @all;
    my ($at) = $out =~ /nginx\.conf:(\d+)/;
    ok(defined $at && grep({ $_ == $at } @lines),
        "$name: points at the civicgate_consent line") or diag $out;
}

for my $c (@good) {
    my $i = $t->nginx('g' . ++$k);
    $i->write_nginx_conf($c->{http});
    my ($rc, $out) = $i->test_config;
    is($rc, 0, "$c->{name}: nginx -t passes") or diag $out;
}

$t->done_testing;
