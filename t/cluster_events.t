#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Journey events through a Redis Cluster of 3 masters (and 3 replicas),
# "mode=cluster" with the default 16 event shards:
#
# A. Over 2 000 events of 100 journeys of 20 citizens, half of them
#    passing a consent check, sent in rounds of concurrent requests (one
#    per journey, so a journey's requests keep their order): every event
#    once in cg:{events:n}, n = CRC-32 of its journey ID mod 16, in
#    request order (rounds 50 ms apart: two workers); the shards are spread over the masters; none in
#    cg:events.
# B. Read back: each journey's timeline cg:{events:n}:timeline:JID (same
#    step IDs as its stream), the timeline endpoint, each citizen's
#    journey index and data-use log (GET /consents/uses).
# C. A followed journey: its registration in cg:{events:n}:watched, its
#    step live over Server-Sent Events.
# D. No batch spanned slots: no CROSSSLOT, no refused event in the log,
#    no failed event in the metrics.
# E. A master killed (SIGKILL) while events flow: the batches with a part
#    on it fail and are written again after its replica takes over; every
#    event is in its stream (distinct eids per journey = its requests).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use POSIX ();
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(json_of);
use Civicgate::Cluster;
use Civicgate::Events qw(event_shard event_stream);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8;
my $NS = 16;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

my $C = Civicgate::Cluster->start($t, masters => 3, replicas => 1);
my $SEEDS = join ' ', $C->seed_urls;
my $API = api_locations(qw(consents status metrics), { heartbeat => '1s' });
my $BACKEND = backend_server(1);

$t->write_nginx_conf(<<"EOF", worker_processes => 2);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis $SEEDS mode=cluster timeout=2s;
    civicgate_consent_cache zone=consent:1m ttl=60s;
    civicgate_data_use_retention 400d;

    civicgate_consent_purposes {
        health   "Layanan kesehatan" "Health services";
    }

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on secure=off;
        civicgate_channel \$http_x_channel;
        civicgate_citizen \$http_x_citizen_id;

        location /clinic/ {
            civicgate_service clinic;
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /free/ {
            civicgate_service free;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
$API
    }

$BACKEND
EOF

$t->run;

sub xlen_all {
    my $n = 0;
    for my $s (0 .. $NS - 1) {
        my $l = $C->query_key(event_stream($s), 'XLEN', event_stream($s));
        $n += $l if defined $l && !ref $l;
    }
    return $n;
}

sub req { $t->citizen_request(@_) }

# the router reads the slot map first
ok($t->wait_until(sub {
    my $r = req('/consents/health', 'NIK-probe', method => 'PUT',
        body => '{}');
    $r->status == 201 || $r->status == 200
}, timeout => 10), 'the gateway reaches the cluster');

###########################################################################
# A. over 2 000 events

my $NC = 20;
my $JPC = 5;
my $ROUNDS = 21;
my @CITIZENS = map { sprintf 'NIK-31710000000%05d', $_ } 1 .. $NC;
my $granted = 0;
for my $c (@CITIZENS) {
    my $r = req('/consents/health', $c, method => 'PUT', body => '{}');
    $granted++ if $r->status == 201;
}
is($granted, $NC, "$NC citizens grant the health purpose");

# journey => citizen
my (%citizen_of, @J);
for my $c (@CITIZENS) {
    for (1 .. $JPC) {
        my $j = mint_journey_id($KEY);
        $citizen_of{$j} = $c;
        push @J, $j;
    }
}

my @CH = qw(web sms app counter);
my (%sent, %clinic, $bad);
$bad = 0;
for my $k (0 .. $ROUNDS - 1) {
    my @reqs = map {
        my $path = ($k % 2) ? '/free/' : '/clinic/';
        Civicgate::Test::build_request("$path?k=$k", headers => [
            'X-Journey-ID' => $_, 'X-Citizen-Id' => $citizen_of{$_},
            'X-Channel' => $CH[$k % @CH] ])
    } @J;
    my @out = http_burst(\@reqs, port => $t->port(0), timeout => 20);
    # the other worker's batch of the previous round is written by then:
    # order holds per worker, and across workers by time
    sleep 0.05;
    for my $i (0 .. $#J) {
        my $r = defined $out[$i] ? parse_response($out[$i]) : undef;
        if ($r && $r->status == 200) {
            push @{ $sent{ $J[$i] } }, $CH[$k % @CH];
            $clinic{ $citizen_of{ $J[$i] } }++ unless $k % 2;
        } else {
            $bad++;
        }
    }
}
my $N = 0;
$N += @{ $sent{$_} } for keys %sent;
is($bad, 0, scalar(@J) . " journeys, $ROUNDS requests each, all answered");
cmp_ok($N, '>=', 2000, "$N events");

ok($t->wait_until(sub { xlen_all() >= $N }, timeout => 20),
    "all $N events in the $NS shard streams") or diag 'XLEN ' . xlen_all();
sleep 0.3;
is(xlen_all(), $N, 'each event once: none lost, none twice');
is($C->query_key('cg:events', 'EXISTS', 'cg:events'), 0,
    'cg:events is not written in cluster mode');

my (%by_master, $misplaced, $disorder, %entries);
$misplaced = $disorder = 0;
for my $s (0 .. $NS - 1) {
    $by_master{ $C->master_of_slot($C->key_slot(event_stream($s))) }++;
    my $x = $C->query_key(event_stream($s), 'XRANGE', event_stream($s),
        '-', '+');
    for my $e (@{ ref $x eq 'ARRAY' ? $x : [] }) {
        my ($id, $fv) = @$e;
        my %f = @$fv;
        $misplaced++ unless event_shard($f{journey}) == $s;
        push @{ $entries{ $f{journey} } }, { id => $id, %f };
    }
}
is(scalar keys %by_master, 3, 'the 16 streams are spread over the 3 masters');
is($misplaced, 0, 'each event in its journey\'s shard');
for my $j (@J) {
    my @ch = map { $_->{channel} } @{ $entries{$j} // [] };
    $disorder++ unless "@ch" eq "@{ $sent{$j} // [] }";
}
is($disorder, 0, 'each journey\'s events in request order');

###########################################################################
# B. read back

{
    my ($tl_bad, $idx_bad, $uses_bad) = (0, 0, 0);
    for my $j (@J) {
        my $key = 'cg:{events:' . event_shard($j) . "}:timeline:$j";
        my $l = $C->query_key($key, 'LRANGE', $key, 0, -1);
        my @ids = map { (split / /)[0] } @{ ref $l eq 'ARRAY' ? $l : [] };
        $tl_bad++ unless "@ids" eq join ' ', map { $_->{id} }
            @{ $entries{$j} // [] };
    }
    is($tl_bad, 0, 'timelines cg:{events:n}:timeline:JID: the stream\'s '
        . 'step IDs, in order');
    is($C->query_key("cg:{j:$J[0]}:timeline", 'EXISTS',
        "cg:{j:$J[0]}:timeline"), 0, 'no cg:{j:JID}:timeline in cluster mode');

    my $r = $t->request("/status/journeys/$J[0]");
    is($r->status, 200, 'the timeline endpoint: 200');
    my $tl = json_of($r->body) // {};
    is(scalar @{ $tl->{steps} // [] }, $ROUNDS, 'with every step');

    for my $c (@CITIZENS) {
        my $P = pseudonym($KEY, $c);
        my $key = "cg:{c:$P}:journeys";
        my $z = $C->query_key($key, 'ZRANGE', $key, 0, -1);
        my %want = map { $_ => 1 } grep { $citizen_of{$_} eq $c } @J;
        my @got = grep { $want{$_} } @{ ref $z eq 'ARRAY' ? $z : [] };
        $idx_bad++ unless @got == $JPC;

        my $u = req('/consents/uses?limit=200', $c);
        my $list = $u->status == 200 ? $JSON->decode($u->body)->{uses} : [];
        my @mine = grep { $_->{purpose} eq 'health'
            && $_->{service} eq 'clinic' && $citizen_of{ $_->{journey} }
            && $citizen_of{ $_->{journey} } eq $c } @$list;
        $uses_bad++ unless @$list == $clinic{$c} && @mine == $clinic{$c};
    }
    is($idx_bad, 0, 'each citizen\'s journey index holds its journeys');
    is($uses_bad, 0, 'each citizen\'s data-use log: one use per consented '
        . 'request, its own');
}

###########################################################################
# C. a followed journey

{
    my $j = $J[1];
    my $s = $t->sse_open("/status/journeys/$j");
    $s->wait_for(sub { @{ $_[0]->events } >= 1 }, 5);
    my ($snap) = @{ $s->new_events };
    is($snap && $snap->{event}, 'snapshot', 'SSE: the snapshot');
    my $w = 'cg:{events:' . event_shard($j) . '}:watched';
    ok($t->wait_until(sub { $C->query_key($w, 'ZSCORE', $w, $j) },
        timeout => 5), 'registered in its shard\'s watch registry');
    req('/free/', $citizen_of{$j}, journey => $j, channel => 'phone');
    $s->wait_for(sub { @{ $_[0]->events } >= 2 }, 5);
    my ($e) = @{ $s->new_events };
    is($e && $e->{event}, 'step', 'SSE: the new step, live');
    my $st = event_stream(event_shard($j));
    my $x = $C->query_key($st, 'XREVRANGE', $st, '+', '-', 'COUNT', 1);
    is($e && $e->{id}, ref $x eq 'ARRAY' ? $x->[0][0] : '',
        'its id: the shard stream\'s entry');
    $s->close;
}

###########################################################################
# D. one slot per call

{
    my $m = $t->metrics;
    is(metric($m, 'civicgate_events_total', result => 'failed') // 0, 0,
        'no event failed');
    my $log = $t->error_log;
    unlike($log, qr/CROSSSLOT/, 'no CROSSSLOT');
    unlike($log, qr/refused a journey event/, 'no refused event');
}

###########################################################################
# E. a master killed while events flow: its shards' batches fail and are
#    written again once its replica took over; none lost

{
    my @K = map { mint_journey_id($KEY) } 1 .. 30;
    my $file = $t->testdir . '/sent-e';
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        my %n;
        my $end = time + 5;
        my $k = 0;
        while (time < $end) {
            my @out = http_burst([ map {
                Civicgate::Test::build_request("/free/?e=$k", headers => [
                    'X-Journey-ID' => $_, 'X-Citizen-Id' => "NIK-E-$_",
                    'X-Channel' => $CH[$k % @CH] ])
            } @K ], port => $t->port(0), timeout => 10);
            for my $i (0 .. $#K) {
                my $r = defined $out[$i] ? parse_response($out[$i]) : undef;
                $n{ $K[$i] }++ if $r && $r->status == 200;
            }
            $k++;
        }
        open my $fh, '>', $file or POSIX::_exit(1);
        print $fh "$_ $n{$_}\n" for keys %n;
        close $fh;
        POSIX::_exit(0);
    }
    sleep 1;
    my $victim = $C->master_of_slot(
        $C->key_slot(event_stream(event_shard($K[0]))));
    my ($new, $took) = $C->kill_master($victim);
    diag(sprintf 'E: master %d killed, replica %d took over in %.1f s',
        $victim, $new, $took);
    waitpid($pid, 0);
    is($?, 0, 'E: requests sent throughout the failover');
    my %sent;
    for (split /\n/, $t->read_file('sent-e') // '') {
        my ($j, $n) = split / /;
        $sent{$j} = $n;
    }
    my $total = 0;
    $total += $_ for values %sent;
    cmp_ok($total, '>', 100, "E: $total events");

    my $eids = sub {
        my %by;
        for my $s (map { event_shard($_) } @K) {
            my $x = $C->query_key(event_stream($s), 'XRANGE',
                event_stream($s), '-', '+');
            for my $e (@{ ref $x eq 'ARRAY' ? $x : [] }) {
                my %f = @{ $e->[1] };
                $by{ $f{journey} }{ $f{eid} } = 1;
            }
        }
        return \%by;
    };
    my $missing = sub {
        my $by = $eids->();
        return scalar grep {
            scalar(keys %{ $by->{$_} // {} }) != ($sent{$_} // 0) } @K;
    };
    ok($t->wait_until(sub { $missing->() == 0 }, timeout => 30),
        'E: every event written once the replica took over (distinct eids '
        . 'per journey: its requests)') or diag 'journeys off: ' . $missing->();
    my $m = $t->metrics;
    diag('E: events failed and written again: '
        . (metric($m, 'civicgate_events_total', result => 'failed') // 0));
    ok($t->wait_until(sub {
        (metric($t->metrics, 'civicgate_event_spool_events') // 0) == 0 },
        timeout => 10), 'E: the spool is empty again');
    $t->allow_log(qr/redis|connect\(\) failed|Connection refused/i);
}

$t->stop;
unlike($t->error_log, qr/CROSSSLOT/, 'no CROSSSLOT, failover included');

$t->done_testing;
