#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# A location with a Redis limit and a local one: a request the local limit
# rejects is not charged in Redis (all limits or none), and a dry run is
# accounted in the zone as limit_req_dry_run accounts it.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);
$t->write_file('file.txt', "static\n");
$t->run_redis;

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    civicgate_limit_zone $http_x_key zone=remote:1m rate=1r/m store=redis;
    civicgate_limit_zone $http_x_key zone=local:1m rate=1r/m store=local;
    civicgate_limit_zone $http_x_key zone=dry:1m rate=1r/m store=redis;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        add_header X-Limit-Status $civicgate_limit_status always;

        location = /mixed {
            civicgate_limit zone=remote burst=5 nodelay;
            civicgate_limit zone=local nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /remote {
            civicgate_limit zone=remote burst=5 nodelay;
            civicgate_limit_headers on;
            alias %%TESTDIR%%/file.txt;
        }
        location = /dry {
            civicgate_limit zone=dry nodelay;
            civicgate_limit_dry_run on;
            alias %%TESTDIR%%/file.txt;
        }
        location = /dry-enforce {
            civicgate_limit zone=dry nodelay;
            alias %%TESTDIR%%/file.txt;
        }
    }
EOF

$t->run;

sub get {
    my ($path, $key) = @_;
    my $r = $t->request($path, headers => [ 'X-Key' => $key ]);
    return ($r->status, $r->header('X-Limit-Status') // '', $r);
}

my @s = map { (get('/mixed', 'k1'))[0] } 1 .. 4;
is("@s", '200 429 429 429', 'the local limit (burst 0) admits one of four');

my ($st, $var, $r) = get('/remote', 'k1');
is($st, 200, 'the Redis limit still admits');
like($r->header('RateLimit') // '', qr/^"remote";r=4;/,
    'Redis was charged for the admitted request only (two of six used)');

($st, $var) = get('/dry', 'k2');
is("$st $var", '200 PASSED', 'dry run: the first request passes');
($st, $var) = get('/dry', 'k2');
is("$st $var", '200 REJECTED_DRY_RUN', 'dry run: the second would be '
    . 'rejected: the first was accounted');
($st, $var) = get('/dry-enforce', 'k2');
is("$st $var", '429 REJECTED', 'an enforcing location on the zone sees '
    . 'the dry run request');

$t->done_testing;
