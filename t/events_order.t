#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Several workers drain the spool side by side, so an older event of a
# journey can reach Redis after a newer one.  What readers derive from the
# timeline goes by the events' time: first_seen is the oldest, last_seen
# the newest, whatever their order in the list.  The gateway's own batch
# script is called, its SHA read from MONITOR; the timeline endpoint reads.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use IO::Socket::INET;
use IO::Select;
use Civicgate::Test qw(:all);
use Civicgate::Status qw(json_of);

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
        location /status/ {
            civicgate_events off;
            civicgate_status;
        }
    }
EOF

$t->run_redis;
$t->run;

my $J = mint_journey_id($KEY);
my $TL = "cg:{j:$J}:timeline";

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
    my $keys = qq{"3" "cg:watched" "cg:events" "cg:{j:$J}:timeline"};
    $sha = $1 if $buf =~ /"EVALSHA" "([0-9a-f]{40})" \Q$keys\E/i;
}
close $mon;
ok($sha, 'the batch script SHA, from MONITOR') or die 'no SHA';

ok($t->wait_until(sub { $t->journey_length($J) == 1 }),
    'the timeline holds it');
my $before = $t->journey_summary($J);

sub timeline { json_of($t->request("/status/journeys/$J")->body) // {} }

sub iso {
    my ($ms) = @_;
    my @t = gmtime(int($ms / 1000));
    return sprintf '%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', $t[5] + 1900,
        $t[4] + 1, @t[3, 2, 1, 0], $ms % 1000;
}

my $tl = timeline();
is($tl->{first_seen}, iso($before->{first_seen}), 'one event: first_seen');
is($tl->{last_seen}, iso($before->{last_seen}), 'one event: last_seen');

# an event one minute older, arriving after it
my $old = $before->{last_seen} - 60000;
my $n = $t->redis_query('EVALSHA', $sha, 3, 'cg:watched', 'cg:events', $TL,
    1000, int(time * 1000),
    $old, 'e0e0e0e0e0e0e0e0', $J, 'sms', 'older', 'GET', 500, '', '',
    3600, 0, "cg:{j:$J}:steps", "", 0);
is($n, 1, 'the older event is written') or diag explain $n;

my $s = $t->journey_summary($J);
is($s->{events}, 2, 'events: 2');
is($s->{first_seen}, $old, 'first_seen: the older event\'s time');
is($s->{last_seen}, $before->{last_seen}, 'last_seen: still the newer one');
is($s->{last_service}, 'newer', 'last_service: the newer event\'s');
is($s->{channels}, 'web,sms', 'channels: both, in the order written');
$tl = timeline();
is($tl->{first_seen}, iso($old), 'timeline: first_seen the older event\'s');
is($tl->{last_seen}, iso($before->{last_seen}),
    'timeline: last_seen still the newer one');
is_deeply($tl->{channels}, [ qw(web sms) ], 'timeline: channels');

# and a newer one updates them
my $new = $before->{last_seen} + 1000;
$t->redis_query('EVALSHA', $sha, 3, 'cg:watched', 'cg:events', $TL,
    1000, int(time * 1000),
    $new, 'e1e1e1e1e1e1e1e1', $J, 'app', 'latest', 'POST', 201, 3, '',
    3600, 0, "cg:{j:$J}:steps", "", 0);
$s = $t->journey_summary($J);
is($s->{last_seen}, $new, 'a newer event: last_seen');
is($s->{last_status}, 201, 'a newer event: last_status');
is($s->{first_seen}, $old, 'first_seen unchanged');
is($s->{events}, 3, 'events: 3');
$tl = timeline();
is($tl->{last_seen}, iso($new), 'timeline: last_seen the newest event\'s');
is($tl->{first_seen}, iso($old), 'timeline: first_seen unchanged');

$t->done_testing;
