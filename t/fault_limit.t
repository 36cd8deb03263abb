#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Rate limits (store=redis) against each fault between nginx and Redis
# (Civicgate::FaultProxy): every request is answered within timeout= plus
# connect_timeout= plus a margin, as its zone's on_error= says (deny: 503
# problem+json, allow: 200, local: the zone's shared memory decides), and
# counted as a fallback; once the fault clears, Redis decides again (one
# limit over two gateways).  Clients that leave while their check waits
# do no harm; a Redis slow but within timeout= changes nothing.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use JSON::PP ();
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::FaultProxy qw(@FAULTS timed_request);

my $t = Civicgate::Test->new;
my $b = $t->nginx('b');

# timeout=200ms connect_timeout=200ms: nothing may take longer than both
# plus a margin for a busy machine
my $BOUND = 0.2 + 0.2 + 1.0;
my $BURST = 3;

for my $n ([ $t, 'PORT_0' ], [ $b, 'PORT_b' ]) {
    my ($inst, $port) = @$n;
    # a static file: "return" would answer before the limits are checked
    $inst->write_file('file.txt', "ok\n");
    $inst->write_nginx_conf(<<"EOF");
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=200ms connect_timeout=200ms;

    civicgate_limit_zone \$http_x_key zone=deny:1m rate=1r/m store=redis on_error=deny;
    civicgate_limit_zone \$http_x_key zone=allow:1m rate=1r/m store=redis on_error=allow;
    civicgate_limit_zone \$http_x_key zone=local:1m rate=1r/m store=redis on_error=local;

    server {
        listen 127.0.0.1:%%$port%%;
        server_name localhost;

        add_header X-Limit-Status \$civicgate_limit_status always;

        location = /deny {
            civicgate_limit zone=deny burst=$BURST nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /allow {
            civicgate_limit zone=allow burst=$BURST nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /local {
            civicgate_limit zone=local burst=$BURST nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
}

# Redis on its own port; the gateways' %%REDIS_PORT%% is the proxy
$t->run_redis(port => 'real');
my $p = Civicgate::FaultProxy->start($t, listen => $t->port('redis'),
    to => $t->redis_port);
$t->run;
$b->run;

my $JSON = JSON::PP->new;
my $nkey = 0;
sub key { sprintf 'k-%d-%d', $$, ++$nkey }

sub fallbacks {
    my ($zone) = @_;
    return metric($t->metrics, 'civicgate_limit_fallbacks_total',
        zone => $zone) // 0;
}

# Redis decides: with 1r/m and burst=3, four requests of one key pass over
# both gateways together, the fifth is refused, whichever gateway gets it
sub redis_decides {
    my ($path) = @_;
    my $k = key();
    my @st = map {
        $t->request($path, headers => [ 'X-Key' => $k ], timeout => 5,
            port => $_ % 2 ? $t->port('b') : $t->port(0))->status
    } 0 .. $BURST + 1;
    return join(' ', @st) eq join(' ', (200) x ($BURST + 1), 429);
}

ok($t->wait_until(sub { redis_decides('/deny') }, timeout => 5),
    'before any fault: Redis decides (one limit over both gateways)');

for my $f (@FAULTS) {
    my ($label, @mode) = @$f;
    my %fb = map { $_ => fallbacks($_) } qw(deny allow local);
    $p->mode(@mode);
    my $t_fault = time;

    my (@late, %st, $max);
    $max = 0;
    my ($kd, $ka, $kl) = (key(), key(), key());
    my ($deny) = ();
    for my $i (1 .. 3) {
        for my $c ([ '/deny', $kd ], [ '/allow', $ka ], [ '/local', $kl ]) {
            my ($r, $el) = timed_request($t, $c->[0],
                headers => [ 'X-Key' => $c->[1] ]);
            $max = $el if $el > $max;
            push @late, sprintf('%s %d: %.3f s', $c->[0], $i, $el)
                if $el > $BOUND;
            push @{ $st{ $c->[0] } }, $r->status;
            $deny //= $r if $c->[0] eq '/deny';
        }
    }
    # later, while the worker reconnects to the faulty Redis
    my $left = $t_fault + 1.6 - time;
    sleep $left if $left > 0;
    for my $i (4 .. 6) {
        my ($r, $el) = timed_request($t, '/deny',
            headers => [ 'X-Key' => $kd ]);
        $max = $el if $el > $max;
        push @late, sprintf('/deny %d: %.3f s', $i, $el) if $el > $BOUND;
        push @{ $st{'/deny'} }, $r->status;
        sleep 0.2;
    }
    is_deeply(\@late, [], sprintf('%s: every request answered within '
        . '%.1f s (max %.3f s)', $label, $BOUND, $max));
    is("@{ $st{'/deny'} }", '503 503 503 503 503 503',
        "$label: on_error=deny: 503, also 1.6 s on");
    like($deny->header('Content-Type') // '', qr{^application/problem\+json},
        "$label: on_error=deny: problem+json");
    my $pj = eval { $JSON->decode($deny->body // '') } // {};
    is($pj->{status}, 503, "$label: on_error=deny: problem status 503");
    is($deny->header('X-Limit-Status'), 'REJECTED',
        "$label: on_error=deny: \$civicgate_limit_status REJECTED");
    is("@{ $st{'/allow'} }", '200 200 200', "$label: on_error=allow: 200");
    is("@{ $st{'/local'} }", '200 200 200',
        "$label: on_error=local: 200 (within the local burst)");
    for my $z (qw(deny allow local)) {
        cmp_ok(fallbacks($z) - $fb{$z}, '>=', 3,
            "$label: fallbacks of zone $z counted");
    }

    # the local fallback still limits: the burst of this key is spent
    my ($r, $el) = timed_request($t, '/local', headers => [ 'X-Key' => $kl ]);
    is($r->status, 200, "$label: on_error=local: 4th request of a key 200");
    ($r, $el) = timed_request($t, '/local', headers => [ 'X-Key' => $kl ]);
    is($r->status, 429, "$label: on_error=local: 5th request of a key 429");

    $p->mode('pass');
    my $t0 = time;
    ok($t->wait_until(sub { redis_decides('/deny') }, timeout => 8,
        interval => 0.1), "$label cleared: Redis decides again");
    diag(sprintf '%s cleared: Redis decides again after %.2f s', $label,
        time - $t0);
}

###########################################################################
# a client that leaves while its check waits on a silent Redis: no harm

{
    $p->mode('blackhole');
    my @w = $t->worker_pids;
    for my $path (qw(/deny /allow /local)) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $t->port(0), Proto => 'tcp', Timeout => 2);
        print $s "GET $path HTTP/1.1\r\nHost: localhost\r\n"
            . 'X-Key: ' . key() . "\r\nConnection: close\r\n\r\n";
        sleep 0.05;
        close $s;
    }
    sleep 0.4;    # past timeout=: the failed checks find their clients gone
    $p->mode('pass');
    my ($r) = timed_request($t, '/allow', headers => [ 'X-Key' => key() ]);
    is($r->status, 200, 'clients gone during a blackhole: the worker serves');
    is_deeply([ $t->worker_pids ], \@w, '  the same worker (no crash)');
}

###########################################################################
# slow, but within timeout= (60 ms each way): nothing falls back, nothing
# times out, under a load of concurrent requests

{
    ok($t->wait_until(sub { redis_decides('/deny') }, timeout => 8),
        'slow Redis: decided by Redis before');
    my $m0 = $t->metrics;
    $p->mode('delay', 60);
    my $job = $t->start_load(clients => 4, requests => 15, interval => 0.03,
        path => sub { $_[0] % 2 ? '/deny' : '/local' },
        headers => sub { [ 'X-Key' => "slow-$_[0]-$_[1]" ] });
    my $res = $t->wait_load($job, timeout => 30);
    $p->mode('pass');
    my $m1 = $t->metrics;
    is_deeply($res->{statuses}, { 200 => 60 },
        'slow Redis: 60 requests of new keys, all 200');
    cmp_ok($res->{max_elapsed}, '<', $BOUND, sprintf(
        'slow Redis: each within %.1f s (max %.3f s)', $BOUND,
        $res->{max_elapsed}));
    for my $z (qw(deny local)) {
        is(metric($m1, 'civicgate_limit_fallbacks_total', zone => $z)
            - metric($m0, 'civicgate_limit_fallbacks_total', zone => $z) , 0,
            "slow Redis: no fallback in zone $z");
    }
    is((metric($m1, 'civicgate_redis_errors_total') // 0)
        - (metric($m0, 'civicgate_redis_errors_total') // 0), 0,
        'slow Redis: no Redis error');
}

$p->stop;
$t->done_testing;
