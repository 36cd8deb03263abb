#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# One Redis connection per worker, named civicgate-<worker pid>, with the
# commands of many requests pipelined on it: a burst of concurrent requests
# on two workers writes every event and opens no further connection.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JRE = journey_id_re();

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF', worker_processes => 2);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    server {
        # reuseport: the kernel spreads connections over both workers
        listen 127.0.0.1:%%PORT_0%% reuseport backlog=1024;
        server_name localhost;

        location /e {
            civicgate_journey on;
            civicgate_channel web;
            civicgate_service burst;
            return 200 "$pid\n";
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF

$t->run_redis;
$t->run;

my @W = $t->worker_pids;
is(scalar @W, 2, 'two workers');

sub gateway_clients {
    return grep { ($_->{name} // '') =~ /^civicgate-/ } $t->redis_clients;
}

sub names_of {
    return join ' ', sort map { $_->{name} } @_;
}

my $want_names = join ' ', sort map { "civicgate-$_" } @W;

# warm up: a request to each worker (both connections exist afterwards)
{
    my %seen;
    for (1 .. 40) {
        my $r = $t->request('/e');
        $seen{ ($r->body // '') =~ /^(\d+)/ ? $1 : '' }++;
        last if keys %seen == 2;
    }
    ok($t->wait_until(sub { gateway_clients() == 2 }, timeout => 5),
        'two gateway connections after warm-up');
    # the warm-up's events are written (a worker sends them within 5 ms)
    my $warm = 0;
    $warm += $_ for values %seen;
    ok($t->wait_until(sub {
        ($t->redis_query('XLEN', 'cg:events') // 0) >= $warm }, timeout => 5),
        "the $warm warm-up events are in cg:events");
    is(names_of(gateway_clients()), $want_names,
        'named civicgate-<worker pid>, one per worker');
}
my %ids_before = map { $_->{name} => $_->{id} } gateway_clients();

###########################################################################
# a burst of 200 concurrent requests

my $N = 200;
my $before_len = $t->redis_query('XLEN', 'cg:events') // 0;
# a warm-up event logged before its worker's connection was ready waited
# in the spool: only the burst's count
my $spooled_before = metric($t->metrics, 'civicgate_events_total',
    result => 'spooled');
my ($conn_before) = $t->redis_query('INFO', 'stats')
    =~ /total_connections_received:(\d+)/;

my @raw = http_burst([ map { Civicgate::Test::build_request('/e?b=' . $_) }
    1 .. $N ], port => $t->port(0), timeout => 20);

my (%journeys, %pids, $ok);
for my $raw (@raw) {
    my $r = parse_response($raw);
    next unless $r->status == 200;
    $ok++;
    my $j = $r->header('X-Journey-ID') // '';
    $journeys{$j}++ if $j =~ $JRE;
    $pids{$1}++ if ($r->body // '') =~ /^(\d+)/;
}
is($ok, $N, "$N concurrent requests answered 200");
is(scalar keys %journeys, $N, "$N distinct journeys minted");
is(scalar keys %pids, 2, 'both workers served the burst')
    or diag explain \%pids;

my $polls = 0;
ok($t->wait_until(sub {
    $polls++;
    ($t->redis_query('XLEN', 'cg:events') // 0) >= $before_len + $N
}, timeout => 10), "all $N events arrive in cg:events");

# each of our queries opens one connection: any other new connection
# since the first INFO was opened by a worker
my ($conn_after) = $t->redis_query('INFO', 'stats')
    =~ /total_connections_received:(\d+)/;
is($conn_after - $conn_before, $polls + 1,
    'no connection opened by the gateway during the burst (pipelining)')
    or diag "connections received: $conn_before -> $conn_after, "
        . "$polls polls";

{
    my $g = $t->redis_stream('cg:events');
    my (%eids, %evj);
    for my $e (@$g) {
        next unless ($e->{f}{service} // '') eq 'burst';
        $eids{ $e->{f}{eid} }++;
        $evj{ $e->{f}{journey} }++;
    }
    my @burst = grep { $journeys{$_} } keys %evj;
    is(scalar @burst, $N, "an event for each of the $N burst journeys");
    is(scalar(grep { $evj{$_} != 1 } @burst), 0,
        'exactly one event per burst journey');
    is(scalar keys %eids, scalar(@$g), 'every eid distinct');
}

{
    my @c = gateway_clients();
    is(scalar @c, 2, 'CLIENT LIST: still exactly 2 gateway connections');
    is(names_of(@c), $want_names, 'CLIENT LIST: civicgate-<pid> of each worker');
    is_deeply({ map { $_->{name} => $_->{id} } @c }, \%ids_before,
        'CLIENT LIST: the same connections (ids) as before the burst');
    my @others = grep { ($_->{name} // '') !~ /^civicgate-/
        && ($_->{cmd} // '') ne 'client|list' } $t->redis_clients;
    is(scalar @others, 0, 'CLIENT LIST: no other connection')
        or diag explain \@others;
    my %w = map { $_ => 1 } @W;
    is(scalar(grep { $w{$_} } map { $_->{name} =~ /(\d+)$/ } @c), 2,
        'connection names are the current worker pids');
}

my $m = $t->metrics;
my $burst_total = $N + ($before_len);
is(metric($m, 'civicgate_events_total', result => 'written'), $burst_total,
    "events_total{result=written} = $burst_total");
is(metric($m, 'civicgate_events_total', result => 'spooled') - $spooled_before,
    0, 'nothing spooled during the burst');

$t->done_testing;
