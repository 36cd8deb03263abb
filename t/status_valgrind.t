#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The status endpoint under valgrind's memcheck (as t/valgrind.t): JSON,
# an SSE client through a change and heartbeats, then gone; long-polls
# woken by a change, timing out, and leaving mid-wait; a journey timeline,
# its SSE stream and a forged ID; the status page (a hostile message, a
# notice code, a journey cookie, a POST); a stream beyond the clients cap, a
# journey long-poll ending at its deadline while Redis is paused; a Redis
# restart under a connected stream; a stream open when nginx stops; with a
# signing key, official notices (found, forged, over the limit), the JWK
# Set and the status as a JWS.  No invalid access, uninitialised use or
# leak of the module's own may show.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);
use Civicgate::Sign qw(ed25519_key);

my $VALGRIND = '/usr/bin/valgrind';
plan skip_all => 'valgrind not installed' unless -x $VALGRIND;
# valgrind cannot run a binary built with AddressSanitizer (make test-asan)
plan skip_all => 'nginx built with sanitizers' if $ENV{CIVICGATE_SANITIZER};

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);
$t->run_redis;
ed25519_key($t, 'signing.pem');

$t->write_nginx_conf(<<'EOF', master_process => 'off');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_signing_key %%TESTDIR%%/signing.pem;
    civicgate_notice_limit 60r/m burst=3;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=2s;
    civicgate_channel $http_x_channel;
    civicgate_status_max_clients 2;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /tax/ {
            civicgate_journey on;
            civicgate_service tax;
            return 200 "tax\n";
        }
        location /status/ {
            civicgate_status;
            civicgate_status_heartbeat 1s;
        }

        location = /page {
            civicgate_status_page;
        }
        location /civicgate/admin/ {
            civicgate_admin;
        }
        location = /jwks {
            civicgate_jwks;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
$t->run(timeout => 60, wrapper => [ $VALGRIND, '--error-exitcode=0',
    '--leak-check=full', '--show-leak-kinds=definite', '--num-callers=30',
    '--log-file=' . $t->testdir . '/valgrind.log' ]);

sub put {
    my ($state) = @_;
    return admin_service($t, PUT => 'tax', { state => $state,
        message => { id => 'pesan', en => 'message' } }, timeout => 20);
}

sub stale { stale_of(json_of($t->request('/status/', timeout => 20))) }

ok($t->wait_until(sub { reached_redis($t, timeout => 20) }, timeout => 20),
    'status reached Redis');

# JSON, 304, a change, a bad body
{
    my $r = $t->request('/status/?lang=all', timeout => 20);
    is($r->status, 200, 'GET: 200');
    is($t->request('/status/', timeout => 20, headers => [ 'If-None-Match'
        => '*' ])->status, 304, 'If-None-Match: *: 304');
    is(put('degraded')->status, 200, 'PUT: 200');
    is(admin_service($t, PUT => 'tax', '{"state":"x"}', timeout => 20)->status,
        400, 'bad PUT: 400');
    is(admin_service($t, DELETE => 'tax', undef, timeout => 20)->status, 200,
        'DELETE: 200');
}

# official notices, the JWK Set, the status as a JWS
{
    my $code = json_of(put('outage'))->{notice} // '';
    like($code, qr/^\w{5}-\w{5}$/, 'PUT: a notice code');
    is($t->request("/status/notices/$code", timeout => 20)->status, 200,
        'notice: 200');
    is($t->request('/status/notices/00000-00000', timeout => 20)->status,
        404, 'forged notice: 404');
    my @st = map { $t->request('/status/notices/x', timeout => 20)->status }
        1 .. 8;
    ok((grep { $_ == 429 } @st), 'notice lookups over the limit: 429')
        or diag "@st";
    is($t->request('/jwks', timeout => 20)->status, 200, 'JWK Set: 200');
    is($t->request('/status/?format=jws', timeout => 20)->status, 200,
        'status as a JWS: 200');
}

# the status page, rendered from the worker's copy
{
    is(admin_service($t, PUT => 'tax', { state => 'outage', message => {
        id => '<script>x</script>' x 50, en => "&\x01\"'" } },
        timeout => 20)->status, 200, 'page: hostile message set');
    ok($t->wait_until(sub { $t->request('/page', timeout => 20)->body
                            =~ /s-outage/ }, timeout => 20),
       'page: rendered with the change');
    like($t->request('/page?lang=en', timeout => 20)->body,
         qr/&amp;\xef\xbf\xbd&quot;&#39;/, 'page: escaped');
    my $j = $t->request('/tax/', timeout => 20)->header('X-Journey-ID') // '';
    like($t->request("/page?notice=ab-12&journey=$j", timeout => 20)->body,
         qr/data-notice="AB-12" data-journey="\Q$j\E"/,
         'page: notice and journey');
    like($t->request('/page?notice=%3C', timeout => 20, headers => [
         Cookie => "cg_journey=$j" ])->body, qr/result bad.*data-journey|data-journey.*result bad/s,
         'page: not a code, the cookie\'s journey');
    is($t->request('/page', method => 'POST', body => 'x',
                   timeout => 20)->status, 405, 'page: POST 405');
}

# SSE: snapshot, a change, heartbeats, gone
{
    my $s = $t->sse_open('/status/');
    ok($s->wait_for(sub { @{ $_[0]->events } >= 1 }, 20), 'SSE snapshot');
    is(put('outage')->status, 200, 'PUT');
    ok($s->wait_for(sub { @{ $_[0]->events } >= 2 }, 20), 'SSE change');
    ok($s->wait_for(sub { grep { $_ eq 'heartbeat' } @{ $_[0]->comments } },
        20), 'SSE heartbeat');
    my $id = $s->events->[-1]{id};
    $s->close;
    put('degraded');
    my $r = $t->sse_open('/status/', headers => [ 'Last-Event-ID' => $id ]);
    ok($r->wait_for(sub { @{ $_[0]->events } >= 1 }, 20), 'SSE resume');
    $r->close;
}

# long-polls: woken, timing out, leaving
{
    my $e = $t->request('/status/', timeout => 20)->header('ETag');
    my $w = $t->sse_open('/status/?wait=30', accept => undef, close => 1,
        headers => [ 'If-None-Match' => $e ]);
    my $gone = $t->sse_open('/status/?wait=30', accept => undef, close => 1,
        headers => [ 'If-None-Match' => $e ]);
    $w->pump(1);
    $gone->close;
    sleep 0.5;
    put('maintenance');
    ok($w->wait_for(sub { $_[0]->closed }, 20), 'long-poll woken');
    is($w->status, 200, 'long-poll: 200');
    $e = $t->request('/status/', timeout => 20)->header('ETag');
    is($t->request('/status/?wait=1', timeout => 20, headers => [
        'If-None-Match' => $e ])->status, 304, 'long-poll: 304 at deadline');
}

# a journey: timeline, SSE, a forged ID
{
    my $r = $t->request('/tax/', headers => [ 'X-Channel' => 'web' ],
        timeout => 20);
    my $j = $r->header('X-Journey-ID') // '';
    ok($t->wait_until(sub {
        $t->journey_length($j) >= 1 },
        timeout => 20), 'journey event written');
    is($t->request("/status/journeys/$j", timeout => 20)->status, 200,
        'timeline: 200');
    is($t->request('/status/journeys/' . mint_journey_id(random_key_hex(32)),
        timeout => 20)->status, 404, 'forged: 404');
    my $s = $t->sse_open("/status/journeys/$j");
    ok($s->wait_for(sub { @{ $_[0]->events } >= 1 }, 20), 'journey SSE');
    $t->request('/tax/', headers => [ 'X-Channel' => 'app',
        'X-Journey-ID' => $j ], timeout => 20);
    ok($s->wait_for(sub { @{ $_[0]->events } >= 2 }, 20), 'journey step');
    $s->close;
}

# the cap: a third client refused; a journey long-poll past its deadline
# while Redis is paused, and one that reaches it with its ETag
{
    my @s = map { $t->sse_open('/status/') } 1 .. 2;
    ok($_->wait_for(sub { @{ $_[0]->events } >= 1 }, 20), 'capped: stream')
        for @s;
    is($t->request('/status/', timeout => 20, headers => [
        'Accept' => 'text/event-stream' ])->status, 503, 'third stream: 503');
    $_->close for @s;
    ok($t->wait_until(sub { (metric($t->metrics(timeout => 20),
        'civicgate_status_clients', kind => 'sse') // -1) == 0 }, timeout => 20), 'streams gone');

    my $r = $t->request('/tax/', timeout => 20);
    my $j = $r->header('X-Journey-ID') // '';
    ok($t->wait_until(sub {
        $t->journey_length($j) >= 1 },
        timeout => 20), 'journey event written');
    my $e = $t->request("/status/journeys/$j", timeout => 20)->header('ETag');
    is($t->request("/status/journeys/$j?wait=1", timeout => 20, headers => [
        'If-None-Match' => $e ])->status, 304, 'journey long-poll: 304');
    $t->redis_cmd('CLIENT', 'PAUSE', 4000, 'ALL');
    is($t->request("/status/journeys/$j?wait=1", timeout => 20, headers => [
        'If-None-Match' => $e ])->status, 503,
        'journey long-poll, Redis paused: 503 at the deadline');
    ok($t->wait_until(sub { ($t->redis_query('PING') // '') eq 'PONG' },
        timeout => 10), 'Redis answers again');
}

# Redis restarted under a connected stream; a stream open at the stop
{
    my $s = $t->sse_open('/status/');
    ok($s->wait_for(sub { @{ $_[0]->events } >= 1 }, 20), 'SSE snapshot');
    $t->stop_redis;
    ok($t->wait_until(sub { stale() }, timeout => 20), 'stale');
    is(put('outage')->status, 503, 'PUT during the outage: 503');
    $t->run_redis;
    ok($t->wait_until(sub { reached_redis($t, timeout => 20) }, timeout => 20),
        'not stale again');
    is(put('outage')->status, 200, 'PUT after the outage');
    ok($s->wait_for(sub { grep { ($_->{event} // '') eq 'service' }
        @{ $_[0]->events } }, 20), 'the change reaches the stream');
    $t->stop;
    ok($s->wait_for(sub { $_[0]->closed }, 20), 'the stream ended at stop');
}

my $log = $t->read_file('valgrind.log') // '';
like($log, qr/Memcheck.*HEAP SUMMARY/s, 'ran under memcheck to a clean exit');
unlike($log, qr/Invalid (read|write|free)|uninitialised|Mismatched free|
    overlap/x, 'no invalid memory access') or diag $log;
my @leaks = grep { /civicgate/ } split /\n(?===\d+== \S)/, $log;
is(scalar(grep { /definitely lost/ } @leaks), 0,
    "nothing of the module's definitely lost") or diag join "\n", @leaks;

$t->done_testing;
