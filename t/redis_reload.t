#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Reloads under load lose no journey event (distinct eids = answered
# requests), and leave exactly one Redis connection per current worker
# (old workers close theirs).

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

my $WP = 2;
$t->write_nginx_conf(<<'EOF', worker_processes => $WP);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    server {
        listen 127.0.0.1:%%PORT_0%% reuseport;
        server_name localhost;

        location /e {
            civicgate_journey on;
            civicgate_channel web;
            civicgate_service reload;
            return 200 "$pid\n";
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF

$t->run_redis;
$t->run;

sub gateway_conns {
    return grep { ($_->{name} // '') =~ /^civicgate-\d+$/ } $t->redis_clients;
}

sub conn_names {
    return join ' ', sort map { $_->{name} } @_;
}

sub worker_names {
    return join ' ', sort map { "civicgate-$_" } $t->worker_pids;
}

# both workers connected
{
    my %seen;
    for (1 .. 40) {
        my $b = $t->request('/e')->body // '';
        $seen{$1}++ if $b =~ /^(\d+)/;
        last if keys %seen == $WP;
    }
    ok($t->wait_until(sub { conn_names(gateway_conns()) eq worker_names() }),
        "$WP connections, one per worker, before the reloads");
}

my $pre = $t->redis_query('XLEN', 'cg:events');

###########################################################################
# load: 2 clients x 200 requests over about 3 s, 2 reloads meanwhile

my $job = $t->start_load(clients => 2, requests => 200, interval => 0.012,
    path => '/e', headers => [ 'X-Channel' => 'web' ]);

my @gens = ([ $t->worker_pids ]);
sleep 0.8;
ok($t->reload, 'first reload under load');
push @gens, [ $t->worker_pids ];
sleep 0.8;
ok($t->reload, 'second reload under load');
push @gens, [ $t->worker_pids ];

my $res = $t->wait_load($job, timeout => 40);
cmp_ok($res->{answered}, '>=', 395, "requests answered ($res->{answered} of 400)")
    or diag explain $res->{statuses};
cmp_ok($res->{max_elapsed}, '<', 1,
    sprintf('no request delayed (max %.3f s)', $res->{max_elapsed}));
my %pids = map { ($_->{body} =~ /^(\d+)/ ? $1 : '') => 1 }
    grep { $_->{status} == 200 } @{ $res->{results} };
cmp_ok(scalar keys %pids, '>=', 3, 'requests were served by old and new workers')
    or diag explain \%pids;

my %sent = map { $_->{journey} => 1 }
    grep { $_->{status} == 200 } @{ $res->{results} };
is(scalar keys %sent, $res->{answered}, 'one minted journey per answered request');

my (%eids, %journeys);
my $ok = $t->wait_until(sub {
    %eids = %journeys = ();
    for my $e (@{ $t->redis_stream('cg:events') }) {
        next unless ($e->{f}{service} // '') eq 'reload';
        next unless $sent{ $e->{f}{journey} };
        $eids{ $e->{f}{eid} } = 1;
        $journeys{ $e->{f}{journey} }++;
    }
    keys %journeys >= keys %sent;
}, timeout => 10, interval => 0.25);
ok($ok, 'the events of the load arrive');
is(scalar keys %eids, $res->{answered},
    'distinct eids in cg:events == requests answered');
is(scalar(grep { !$journeys{$_} } keys %sent), 0,
    'every answered request has its event');

###########################################################################
# after the dust settles: one connection per current worker

{
    # old workers finish (their connections close)
    my %cur = map { $_ => 1 } $t->worker_pids;
    my @old = grep { !$cur{$_} } map { @$_ } @gens;
    ok($t->wait_until(sub { !grep { kill 0, $_ } @old }, timeout => 10),
        'old workers exited');
    is(scalar $t->worker_pids, $WP, "$WP current workers");
    my $good = $t->wait_until(sub {
        conn_names(gateway_conns()) eq worker_names() }, timeout => 5);
    ok($good, "CLIENT LIST: exactly $WP gateway connections, "
        . 'civicgate-<pid> of the current workers')
        or diag 'connections: ' . conn_names(gateway_conns())
            . '; workers: ' . worker_names();
    my @c = gateway_conns();
    is(scalar @c, $WP, "CLIENT LIST: $WP civicgate connections (no leak)");
}

###########################################################################
# the spool survives a reload: Redis down, requests, reload, Redis back

{
    $t->stop_redis;
    my %spooled;
    my $bad = 0;
    for (1 .. 50) {
        my $r = $t->request('/e', headers => [ 'X-Channel' => 'web' ]);
        $bad++ unless $r->status == 200;
        $spooled{ $r->header('X-Journey-ID') // '' } = 1;
    }
    is($bad, 0, 'Redis down: 50 requests answered');
    ok($t->wait_until(sub { (metric($t->metrics, 'civicgate_events_total',
        result => 'spooled') // 0) >= 50 }, timeout => 3), 'spooled >= 50');
    ok($t->reload, 'reload while the events wait in the spool');
    $t->run_redis;    # empty
    my %got;
    my $ok = $t->wait_until(sub {
        %got = map { $_->{f}{journey} => 1 }
            @{ $t->redis_stream('cg:events') };
        !grep { !$got{$_} } keys %spooled;
    }, timeout => 8, interval => 0.25);
    ok($ok, 'after the reload all 50 spooled events are written')
        or diag scalar(grep { $got{$_} } keys %spooled) . ' of 50';
    ok($t->wait_until(sub { conn_names(gateway_conns()) eq worker_names() },
        timeout => 5), "again exactly $WP connections, of the current workers");
}

###########################################################################
# commands in flight at a reload: the old worker waits (bounded by the
# timeout) and spools what fails; nothing is lost

my $inflight = 0;
{
    ok($t->wait_until(sub { conn_names(gateway_conns()) eq worker_names() },
        timeout => 5), 'connected before the stall');
    my @old = $t->worker_pids;
    kill 'STOP', $t->redis_pid;
    my %sent;
    for (1 .. 10) {
        my $r = $t->request('/e', headers => [ 'X-Channel' => 'web' ]);
        $sent{ $r->header('X-Journey-ID') // '' } = 1 if $r->status == 200;
    }
    $inflight = keys %sent;
    is($inflight, 10, 'Redis stalled: 10 requests answered');
    my $t0 = time;
    ok($t->reload, 'reload with commands in flight');
    ok($t->wait_until(sub { !grep { kill 0, $_ } @old }, timeout => 5),
        sprintf('old workers exit while Redis stalls (%.2f s)', time - $t0));
    kill 'CONT', $t->redis_pid;
    my %got;
    my $ok = $t->wait_until(sub {
        %got = map { $_->{f}{journey} => 1 }
            @{ $t->redis_stream('cg:events') };
        !grep { !$got{$_} } keys %sent;
    }, timeout => 8, interval => 0.25);
    ok($ok, 'the 10 events in flight at the reload are written')
        or diag scalar(grep { $got{$_} } keys %sent) . ' of 10';
    ok($t->wait_until(sub { conn_names(gateway_conns()) eq worker_names() },
        timeout => 5), "exactly $WP connections, of the current workers")
        or diag 'connections: ' . conn_names(gateway_conns())
            . '; workers: ' . worker_names();
}

{
    my $m = $t->metrics;
    is(metric($m, 'civicgate_events_total', result => 'dropped'), 0,
        'nothing dropped');
    cmp_ok(metric($m, 'civicgate_events_total', result => 'written'), '>=',
        $pre + $res->{answered} + 50 + $inflight, 'events_total{result=written} counts them all'
        . ' (counters survive reloads)');
}

$t->done_testing;
