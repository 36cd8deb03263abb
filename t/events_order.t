#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Several workers drain the spool side by side, so an older event of a
# journey can reach Redis after a newer one.  The journey summary goes by
# the events' time: first_seen is the oldest, the last_* fields are the
# newest's.  The gateway's own script is called, its SHA read from MONITOR.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use IO::Socket::INET;
use IO::Select;
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
        civicgate_channel $http_x_channel;

        location /ev {
            civicgate_service newer;
            return 200 "ok\n";
        }
    }
EOF

$t->run_redis;
$t->run;

my $J = mint_journey_id($KEY);
my $SUM = "cg:{j:$J}:summary";

my $mon = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
    PeerPort => $t->redis_port) or die "redis: $!";
syswrite($mon, "MONITOR\r\n");
# the event must not reach Redis before MONITOR is on
my $ok = '';
my $on = IO::Select->new($mon);
while ($ok !~ /\r\n/ && $on->can_read(5)) {
    sysread($mon, $ok, 64, length $ok) or last;
}
like($ok, qr/^\+OK\r\n/, 'MONITOR is on');

my $r = $t->request('/ev', headers => [ 'X-Journey-ID' => $J,
    'X-Channel' => 'web' ]);
is($r->status, 200, 'an event of the journey');

my ($sha, $buf) = (undef, '');
my $sel = IO::Select->new($mon);
my $end = time + 10;
while (!$sha && time < $end) {
    next unless $sel->can_read(0.2);
    my $n = sysread($mon, $buf, 65536, length $buf);
    last if defined $n && $n == 0;
    $sha = $1 if $buf =~ /"EVALSHA" "([0-9a-f]{40})" "2" "cg:\{j:\Q$J\E\}:events"/i;
}
close $mon;
ok($sha, 'the journey script SHA, from MONITOR') or die 'no SHA';

ok($t->wait_until(sub { ($t->redis_hash($SUM)->{events} // 0) == 1 }),
    'the summary counts it');
my $before = $t->redis_hash($SUM);

# an event one minute older, arriving after it
my $old = $before->{last_seen} - 60000;
my $id = $t->redis_query('EVALSHA', $sha, 2, "cg:{j:$J}:events", $SUM,
    $old, 'e0e0e0e0e0e0e0e0', $J, 'sms', 'older', 'GET', 500, '', '',
    3600, 1000);
ok(defined $id && !is_redis_error($id), 'the older event is written')
    or diag explain $id;

my $s = $t->redis_hash($SUM);
is($s->{events}, 2, 'events: 2');
is($s->{first_seen}, $old, 'first_seen: the older event\'s time');
is($s->{last_seen}, $before->{last_seen}, 'last_seen: still the newer one');
is($s->{last_status}, 200, 'last_status: the newer event\'s');
is($s->{last_service}, 'newer', 'last_service: the newer event\'s');
is($s->{last_channel}, 'web', 'last_channel: the newer event\'s');
is($s->{channels}, 'web,sms', 'channels: both');

# and a newer one updates them
my $new = $before->{last_seen} + 1000;
$t->redis_query('EVALSHA', $sha, 2, "cg:{j:$J}:events", $SUM,
    $new, 'e1e1e1e1e1e1e1e1', $J, 'app', 'latest', 'POST', 201, 3, '',
    3600, 1000);
$s = $t->redis_hash($SUM);
is($s->{last_seen}, $new, 'a newer event: last_seen');
is($s->{last_status}, 201, 'a newer event: last_status');
is($s->{first_seen}, $old, 'first_seen unchanged');
is($s->{events}, 3, 'events: 3');

$t->done_testing;
