#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Status clients are bounded (one worker): beyond
# civicgate_status_max_clients, event streams and long-polls, on the
# status and on journeys, get 503 problem+json with Retry-After, and the
# clients gauge counts only those admitted; plain requests are not
# limited.  A journey long-poll ends by its wait, even while Redis is
# slower than that, and a journey stream waits for its subscription one
# heartbeat at most.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);

my $t = Civicgate::Test->new;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);

$t->write_nginx_conf(status_http(redis => ' timeout=10s',
    http => <<'EOF', locations => <<'EOF', status => <<'EOF'),
civicgate_secret_file %%TESTDIR%%/keys;
civicgate_status_max_clients 2;
EOF
location /step/ {
    civicgate_journey on;
    civicgate_service tax;
    return 200 "step\n";
}
EOF
civicgate_status_heartbeat 1s;
EOF
    worker_processes => 1);

$t->run_redis;
$t->run;

ok($t->wait_until(sub { reached_redis($t) }, timeout => 5),
    'the worker reached Redis');

my $E = $t->request('/status/')->header('ETag');
my $J = $t->request('/step/x')->header('X-Journey-ID');
like($J // '', journey_id_re(), 'a journey');
ok($t->wait_until(sub {
    $t->journey_length($J) >= 1 }, timeout => 5),
    'its step is in Redis');
my $JE = $t->request("/status/journeys/$J")->header('ETag');

sub refused {
    my ($r, $what) = @_;
    is($r->status, 503, "$what: 503");
    is($r->header('Retry-After'), '5', "$what: Retry-After");
    like($r->header('Content-Type') // '', qr{^application/problem\+json},
        "$what: problem+json");
    my $p = json_of($r) // {};
    is($p->{type} // '', 'urn:civicgate:problem:too-many-clients',
        "$what: problem type");
}

sub sse_ok {
    my ($s, $what) = @_;
    ok($s->wait_for(sub { @{ $_[0]->events } >= 1 }, 5), "$what: snapshot");
    is($s->status, 200, "$what: 200");
}

# two streams fill the worker's quota
my @s = map { $t->sse_open('/status/') } 1 .. 2;
sse_ok($s[$_], "stream " . ($_ + 1)) for 0 .. 1;
ok($t->wait_until(sub { (status_clients($t, 'sse') // -1) == 2 },
    timeout => 3), 'sse gauge 2');

my $r = $t->request('/status/',
    headers => [ 'Accept' => 'text/event-stream' ], timeout => 5);
refused($r, 'a third stream');

$r = $t->request('/status/?wait=30',
    headers => [ 'If-None-Match' => $E ], timeout => 5);
refused($r, 'a status long-poll');

$r = $t->request("/status/journeys/$J?wait=30",
    headers => [ 'If-None-Match' => $JE ], timeout => 5);
refused($r, 'a journey long-poll');

$r = $t->request("/status/journeys/$J",
    headers => [ 'Accept' => 'text/event-stream' ], timeout => 5);
refused($r, 'a journey stream');

my $line = 'civicgate: 2 status clients on this worker, more are refused '
    . '(logged once every 10 s)';
like($t->error_log, qr/\[warn\].*\Q$line\E/, 'refusals are logged');
is(() = $t->error_log =~ /more are refused/g, 1, '  once');

is($t->request('/status/')->status, 200, 'a plain status request: 200');
is($t->request("/status/journeys/$J")->status, 200,
    'a plain timeline request: 200');
is($t->request('/status/', headers => [ 'If-None-Match' => $E ])->status,
    304, 'a revalidation without wait: 304');
is(status_clients($t, 'sse'), 2, 'sse gauge still 2');
is(status_clients($t, 'longpoll'), 0, 'longpoll gauge 0: none admitted');

# a client leaves: a long-poll takes its place
$s[0]->close;
ok($t->wait_until(sub { (status_clients($t, 'sse') // -1) == 1 },
    timeout => 3), 'sse gauge 1 after a stream closed');

{
    my $t0 = time;
    $r = $t->request('/status/?wait=1',
        headers => [ 'If-None-Match' => $E ], timeout => 5);
    is($r->status, 304, 'with room again, a long-poll is held: 304');
    cmp_ok(time - $t0, '>=', 0.9, '  after its wait');
}

$s[1]->close;
ok($t->wait_until(sub { (status_clients($t, 'sse') // -1) == 0
    && (status_clients($t, 'longpoll') // -1) == 0 }, timeout => 3),
    'gauges back to 0');

# Redis slower than the wait: the long-poll still ends by its deadline
{
    $t->redis_cmd('CLIENT', 'PAUSE', 3000, 'ALL');
    my $t0 = time;
    $r = $t->request("/status/journeys/$J?wait=1",
        headers => [ 'If-None-Match' => $JE ], timeout => 8);
    my $el = time - $t0;
    cmp_ok($el, '<', 2.5, sprintf('a journey long-poll (wait=1) ends by '
        . 'its deadline while Redis is paused (%.2f s)', $el));
    is($r->status, 503, '  with 503: the timeline could not be read');
    like($r->header('Content-Type') // '', qr{^application/problem\+json},
        '  problem+json');
    ok($t->wait_until(sub { ($t->redis_query('PING') // '') eq 'PONG' },
        timeout => 5), 'Redis answers again');
}

# Redis slow, but less than the wait: the wait counts from the request
{
    $t->redis_cmd('CLIENT', 'PAUSE', 1500, 'ALL');
    my $t0 = time;
    $r = $t->request("/status/journeys/$J?wait=2",
        headers => [ 'If-None-Match' => $JE ], timeout => 8);
    my $el = time - $t0;
    is($r->status, 304, 'a journey long-poll (wait=2), Redis slow: 304');
    cmp_ok($el, '<', 3.2, sprintf('  within its wait, not after the read '
        . 'plus the wait (%.2f s)', $el));
}

# a journey stream whose subscription never comes (the ACL refuses the
# channel) starts anyway after a heartbeat instead of waiting for ever
{
    $t->redis_cmd('ACL', 'SETUSER', 'default', 'resetchannels',
        '&cg:{status}:changes');
    my $t0 = time;
    my $x = $t->sse_open("/status/journeys/$J");
    ok($x->wait_for(sub { @{ $_[0]->events } >= 1 }, 5),
        'a journey stream without its subscription: snapshot');
    my $el = time - $t0;
    cmp_ok($el, '<', 2.5, sprintf('  after about a heartbeat (%.2f s)', $el));
    is($x->events->[0]{event}, 'snapshot', '  a snapshot');
    $x->close;
    $t->redis_cmd('ACL', 'SETUSER', 'default', 'allchannels');
}

# the directive's checks, by nginx -t
{
    my $c = $t->nginx('cfg');
    for my $case (
        [ "civicgate_status_max_clients 0;\n",
          qr/invalid number of clients "0", it must be a number of at least 1/ ],
        [ "civicgate_status_max_clients many;\n",
          qr/invalid number of clients "many"/ ],
        [ "civicgate_status_max_clients 5;\ncivicgate_status_max_clients 6;\n",
          qr/"civicgate_status_max_clients" directive is duplicate/ ])
    {
        $c->write_nginx_conf($case->[0]);
        my ($rc, $out) = $c->test_config;
        isnt($rc, 0, "nginx -t fails: $case->[0]");
        like($out, $case->[1], '  with the message');
    }
}

$t->done_testing;
