#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The watch registry over time: a worker that follows a journey sets its
# registration 90 s ahead again every 30 s, and removes registrations that
# have run out.  (A first registration and its effect on publishing are in
# t/events_batch.t.)

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);
$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on;

        location /e {
            return 200 "ok\n";
        }
        location /status/ {
            civicgate_events off;
            civicgate_status;
        }
    }
EOF

$t->run_redis;
$t->run;

my $J = $t->request('/e')->header('X-Journey-ID');
# a registration that ran out long ago
$t->redis_query('ZADD', 'cg:watched', 1000, 'STALE');
ok($t->wait_until(sub { $t->journey_length($J) == 1 }), 'a journey');
my $s = $t->sse_open("/status/journeys/$J");
$s->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
my $first = $t->redis_query('ZSCORE', 'cg:watched', $J) // 0;
ok($first > time * 1000 + 80000, 'followed: registered about 90 s ahead');
$s->pump(31);
my $again = $t->redis_query('ZSCORE', 'cg:watched', $J) // 0;
ok($again > $first + 25000, "30 s later: registered again ($first -> $again)");
ok(!defined $t->redis_query('ZSCORE', 'cg:watched', 'STALE'),
    'the registration that ran out is removed');
$t->done_testing;
