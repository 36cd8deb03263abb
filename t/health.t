#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# civicgate_health with two workers: 200 while Redis answers; maintenance
# switched on and off through the admin endpoint, seen by every worker at
# once and kept across a reload; a storm of checks within an interval, and
# checks waiting on a slow PING, cost at most one PING per worker; Redis
# stopped: 503 "redis" within the interval and the timeout, 200 once it
# is back; a spool past its high-water mark: 503 "spool", before any event
# is dropped; without Redis only the maintenance flag counts.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF', worker_processes => 2);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=1s;
    civicgate_event_buffer 32k;
    civicgate_consent_purposes {
        health "Kesehatan" "Health";
    }

    server {
        listen 127.0.0.1:%%PORT_0%% reuseport;
        server_name localhost;
        add_header X-Pid $pid always;

        location = /health {
            civicgate_health;
        }
        location = /storm {
            civicgate_health interval=3s;
        }
        location = /fresh {
            civicgate_health interval=1ms;
        }
        location /admin/ {
            civicgate_admin;
        }
        location /e {
            civicgate_journey on;
            return 200;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF

$t->run_redis;
$t->run;

sub health {
    my ($path, %o) = @_;
    my $r = $t->request($path // '/health', %o);
    my $j = eval { $JSON->decode($r->body // '') };
    return ($r, $j);
}

# $n answers in a row, from both workers, all as $want says
sub all_answer {
    my ($want, $name, %o) = @_;
    my ($n, %pids, $last) = (0);
    my $ok = $t->wait_until(sub {
        my ($r, $j) = health($o{path});
        $last = $r->status . ' ' . ($r->body // '');
        if ($r->status == $want->[0] && $j
            && ($j->{status} // '') eq $want->[1]
            && ($j->{reason} // '') eq ($want->[2] // ''))
        {
            $n++;
            $pids{ $r->header('X-Pid') // '' }++;
        } else {
            ($n, %pids) = (0);
        }
        return $n >= 20 && keys %pids == 2;
    }, timeout => $o{timeout} // 10, interval => 0.02);
    ok($ok, "$name: 20 answers in a row from both workers: @$want")
        or diag "last: $last";
    return $ok;
}

sub cmdstat {
    my ($cmd) = @_;
    my $info = $t->redis_query('INFO', 'commandstats') // '';
    return $info =~ /^cmdstat_\Q$cmd\E:calls=(\d+)/m ? $1 : 0;
}

###########################################################################
# Redis up

all_answer([ 200, 'ok' ], 'Redis up');

{
    my ($r, $j) = health();
    is($r->status, 200, 'GET: 200');
    is($r->body, qq({"status":"ok"}\n), 'GET: {"status":"ok"}');
    is($r->header('Content-Type'), 'application/json', 'application/json');
    is($r->header('Cache-Control'), 'no-store', 'Cache-Control: no-store');

    $r = $t->request('/health', method => 'HEAD');
    is($r->status, 200, 'HEAD: 200');
    is($r->body, '', 'HEAD: no body');
    is($r->header('Content-Length'), 16, 'HEAD: the length of the body');

    $r = $t->request('/health', method => 'POST', body => 'x');
    is($r->status, 405, 'POST: 405');
}

###########################################################################
# maintenance

{
    my $r = $t->request('/admin/maintenance');
    is($r->status, 200, 'admin GET maintenance: 200');
    is($r->body, qq({"maintenance":false}\n), 'maintenance off at start');

    $r = $t->request('/admin/maintenance', method => 'PUT', body => '');
    is($r->status, 200, 'admin PUT maintenance: 200');
    is($r->body, qq({"maintenance":true}\n), 'maintenance on');

    # at once, on every worker: no request in between may see it off
    my (%pids, $bad);
    for (1 .. 40) {
        my ($h, $j) = health();
        $bad++ unless $h->status == 503 && $j
            && $j->{status} eq 'maintenance' && !exists $j->{reason}
            && $h->header('Content-Type') eq 'application/json';
        $pids{ $h->header('X-Pid') // '' }++;
    }
    ok(!$bad, 'maintenance: every check 503 {"status":"maintenance"}')
        or diag "$bad bad";
    is(scalar keys %pids, 2, 'maintenance: both workers answered');

    $r = $t->request('/health', method => 'HEAD');
    is($r->status, 503, 'maintenance: HEAD 503');

    is($t->request('/admin/maintenance')->body, qq({"maintenance":true}\n),
        'admin GET: on');
    is(metric($t->metrics, 'civicgate_maintenance'), 1, 'gauge: 1');

    $r = $t->request('/admin/maintenance', method => 'POST', body => '');
    is($r->status, 405, 'admin POST maintenance: 405');
    is($r->header('Allow'), 'GET, HEAD, PUT, DELETE', 'Allow');
    like($r->header('Content-Type'), qr{^application/problem\+json},
        '405 as problem+json');

    ok($t->reload, 'reload');
    all_answer([ 503, 'maintenance' ], 'maintenance kept across the reload');
    is(metric($t->metrics, 'civicgate_maintenance'), 1, 'gauge still 1');

    $r = $t->request('/admin/maintenance', method => 'DELETE');
    is($r->status, 200, 'admin DELETE maintenance: 200');
    is($r->body, qq({"maintenance":false}\n), 'maintenance off');

    my $ok = 0;
    %pids = ();
    for (1 .. 40) {
        my ($h, $j) = health();
        $ok++ if $h->status == 200 && $j && $j->{status} eq 'ok';
        $pids{ $h->header('X-Pid') // '' }++;
    }
    is($ok, 40, 'maintenance off: every check 200 at once');
    is(scalar keys %pids, 2, 'both workers answered');
    is(metric($t->metrics, 'civicgate_maintenance'), 0, 'gauge: 0');

    like($t->error_log, qr/\[notice\].*civicgate: maintenance on/,
        'switching is logged');
}

###########################################################################
# a storm within one interval: at most one PING per worker

{
    # the answers of the earlier checks are older than the interval now
    sleep 3.1;
    my $p0 = cmdstat('ping');
    my @raw = http_burst([ map { "GET /storm HTTP/1.0\r\nHost: l\r\n\r\n" }
        1 .. 200 ], port => $t->port(0), timeout => 20);
    my %st;
    $st{ parse_response($_)->status }++ for @raw;
    is_deeply(\%st, { 200 => 200 }, 'storm: 200 checks answered 200');
    my $pings = cmdstat('ping') - $p0;
    ok($pings >= 1 && $pings <= 2,
        "storm: $pings PING(s) at Redis for 200 checks (one per worker)");
}

{
    # Redis holds the PING: every check waits for the one in flight
    my $p0 = cmdstat('ping');
    $t->redis_query('CLIENT', 'PAUSE', 600, 'ALL');
    my $start = time;
    my @raw = http_burst([ map { "GET /fresh HTTP/1.0\r\nHost: l\r\n\r\n" }
        1 .. 100 ], port => $t->port(0), timeout => 20);
    my $elapsed = time - $start;
    my %st;
    $st{ parse_response($_)->status }++ for @raw;
    is_deeply(\%st, { 200 => 100 }, 'slow PING: 100 waiting checks got 200');
    cmp_ok($elapsed, '>=', 0.3, sprintf('they waited for the PING (%.2f s)',
        $elapsed));
    my $pings = cmdstat('ping') - $p0;
    ok($pings >= 1 && $pings <= 2,
        "slow PING: $pings PING(s) for 100 waiting checks");

    my $m = $t->metrics;
    cmp_ok(metric($m, 'civicgate_redis_command_duration_seconds_bucket',
        le => '+Inf') - metric($m,
        'civicgate_redis_command_duration_seconds_bucket', le => '0.25'),
        '>=', 1, 'the slow PING is in the top bucket of the histogram');
}

###########################################################################
# Redis stopped, and back

{
    $t->stop_redis;
    my $start = time;
    my ($r, $j);
    my $ok = $t->wait_until(sub {
        ($r, $j) = health();
        return $r->status == 503;
    }, timeout => 10, interval => 0.05);
    my $el = time - $start;
    ok($ok, sprintf('Redis stopped: 503 after %.2f s', $el));
    cmp_ok($el, '<=', 1 + 1 + 1.5, 'within the interval and the timeout');
    is($r->body, qq({"status":"unavailable","reason":"redis"}\n),
        'reason: redis');
    is($r->header('Content-Type'), 'application/json', 'application/json');
    all_answer([ 503, 'unavailable', 'redis' ], 'Redis stopped');

    $t->run_redis;
    all_answer([ 200, 'ok' ], 'Redis back', timeout => 15);
}

###########################################################################
# the spool past its high-water mark

{
    $t->stop_redis;
    all_answer([ 503, 'unavailable', 'redis' ], 'Redis stopped again');

    my ($sent, $first_spool, $spooled_then, $dropped_then) = (0);
    my $m;
    while ($sent < 2000) {
        $t->request('/e') for 1 .. 4;
        $sent += 4;
        my ($r, $j) = health();
        $m = $t->metrics;
        if (!defined $first_spool && $r->status == 503
            && ($j->{reason} // '') eq 'spool')
        {
            $first_spool = $sent;
            $spooled_then = metric($m, 'civicgate_events_total',
                result => 'spooled');
            $dropped_then = metric($m, 'civicgate_events_total',
                result => 'dropped');
        }
        last if metric($m, 'civicgate_events_total', result => 'dropped');
    }
    ok(defined $first_spool,
        'spool: 503 spool after ' . ($first_spool // 'no') . ' events')
        or diag explain $m;
    my $capacity = metric($m, 'civicgate_events_total', result => 'spooled');
    is($dropped_then, 0, 'spool: reported before any event was dropped');
    my $share = $capacity ? $spooled_then / $capacity : 0;
    ok($share >= 0.85 && $share <= 0.97,
        sprintf('spool: reported at %.0f%% of its %d slots (mark: 90%%)',
            100 * $share, $capacity));
    all_answer([ 503, 'unavailable', 'spool' ], 'spool full, Redis down');

    $t->run_redis;
    all_answer([ 200, 'ok' ], 'Redis back, spool written', timeout => 20);
    ok($t->wait_until(sub {
        my $n = $t->redis_query('XLEN', 'cg:events');
        defined $n && !ref $n && $n >= $capacity;
    }, timeout => 10), 'the spooled events reached Redis');
}

###########################################################################
# without Redis: the maintenance flag only

{
    my $b = $t->nginx('b');
    $b->write_nginx_conf(<<'EOF');
    server {
        listen 127.0.0.1:%%PORT_b%%;
        location = /health { civicgate_health interval=5s; }
    }
EOF
    $b->run;
    my $r = $b->request('/health', port => $t->port('b'));
    is($r->status, 200, 'without Redis: 200');
    is($r->body, qq({"status":"ok"}\n), 'without Redis: ok');
    $b->stop;
}

###########################################################################
# configuration errors

for my $c (
    [ 'civicgate_health interval=0;', qr/invalid interval "interval=0"/,
      'a zero interval' ],
    [ 'civicgate_health interval=soon;', qr/invalid interval/,
      'an invalid interval' ],
    [ 'civicgate_health every=1s;', qr/invalid parameter "every=1s"/,
      'an unknown parameter' ],
    [ 'civicgate_health; civicgate_health;', qr/is duplicate/,
      'a repeated directive' ],
    [ 'civicgate_health 1s 2s;', qr/invalid number of arguments/,
      'two parameters' ],
) {
    my $i = $t->nginx('conf');
    $i->write_nginx_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT_c%%;
        location = /health { $c->[0] }
    }
EOF
    my ($rc, $out) = $i->test_config;
    isnt($rc, 0, "nginx -t fails on $c->[2]");
    like($out, $c->[1], "$c->[2]: the error names it") or diag $out;
}

$t->done_testing;
