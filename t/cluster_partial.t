#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Batches of journey events partly refused by a Redis Cluster (3 masters,
# "mode=cluster", 16 event shards, one worker): a batch is one call per
# shard and one per citizen, and one call that fails must not have the
# others' parts written again.  The refusals are made with a key of the
# wrong type (WRONGTYPE), as long as the test wants:
#
# A. A citizen's journey index is a string: the calls for that citizen
#    fail, the shard calls of its events succeed.  Its events are in
#    their streams and timelines once each while the citizen's part waits
#    in the spool and is retried; the events of another citizen in the same
#    batches are written once, their uses too; once the index is repaired,
#    the index and the data-use log get each event's part once, and no
#    event reaches its stream again.
# B. A shard's stream is a string: the calls for that shard fail.  The
#    events of other shards (logged in the same batches, and spooled behind
#    the failing ones, so drained in the same claims) are in their streams
#    once each, and the citizen's data-use log has every request's use
#    once, the failing shard's included; once the stream is repaired, its
#    events are written, once each.
# Both: the failed counter grows (the retries happened), nothing dropped.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Cluster;
use Civicgate::Events qw(event_shard event_stream);

my $t = Civicgate::Test->new;
my $NS = 16;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

my $C = Civicgate::Cluster->start($t, masters => 3, replicas => 0);
my $SEEDS = join ' ', $C->seed_urls;

$t->write_nginx_conf(<<"EOF", worker_processes => 1);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis $SEEDS mode=cluster timeout=1s;
    civicgate_data_use_retention 400d;

    civicgate_consent_purposes {
        health   "Layanan kesehatan" "Health services";
    }

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on secure=off;
        civicgate_citizen \$http_x_citizen_id;

        location /clinic/ {
            civicgate_service clinic;
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /consents/ {
            civicgate_events off;
            civicgate_consent_api;
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        civicgate_journey off;
        location / { return 200 "backend\\n"; }
    }
EOF

$t->run;

sub shard { event_shard($_[0], $NS) }
sub stream { event_stream($_[0]) }

sub req {
    my ($path, $citizen, %o) = @_;
    return $t->request($path, method => $o{method} // 'GET',
        headers => [ 'X-Citizen-Id' => $citizen,
                     ($o{journey} ? ('X-Journey-ID' => $o{journey}) : ()) ],
        (defined $o{body} ? (body => $o{body}) : ()));
}

# a new journey on that shard (or on none of those)
sub journey {
    my ($on, @not) = @_;
    while (1) {
        my $j = mint_journey_id($KEY);
        my $s = shard($j);
        next if defined $on && $s != $on;
        next if grep { $_ == $s } @not;
        return $j;
    }
}

# journey => the number of its entries in the shard streams
sub in_streams {
    my %n;
    for my $s (0 .. $NS - 1) {
        my $x = $C->query_key(stream($s), 'XRANGE', stream($s), '-', '+');
        next unless ref $x eq 'ARRAY';
        for my $e (@$x) {
            my %f = @{ $e->[1] };
            $n{ $f{journey} }++;
        }
    }
    return \%n;
}

sub timeline_len {
    my ($j) = @_;
    my $key = 'cg:{events:' . shard($j) . "}:timeline:$j";
    my $n = $C->query_key($key, 'LLEN', $key);
    return ref $n ? -1 : $n // 0;
}

sub keys_of {
    my ($c) = @_;
    my $P = pseudonym($KEY, $c);
    my @tm = gmtime;
    return ("cg:{c:$P}:journeys",
        sprintf 'cg:{c:%s}:uses:%04d%02d', $P, $tm[5] + 1900, $tm[4] + 1);
}

# journey => the number of its entries in the citizen's data-use log
sub uses_of {
    my ($c) = @_;
    my (undef, $key) = keys_of($c);
    my $l = $C->query_key($key, 'LRANGE', $key, 0, -1);
    my %n;
    $n{ (split / /)[4] }++ for @{ ref $l eq 'ARRAY' ? $l : [] };
    return \%n;
}

sub indexed {
    my ($c) = @_;
    my ($key) = keys_of($c);
    my $z = $C->query_key($key, 'ZRANGE', $key, 0, -1);
    return { map { $_ => 1 } @{ ref $z eq 'ARRAY' ? $z : [] } };
}

# the counts of these journeys that are not exactly one
sub not_once {
    my ($n, @j) = @_;
    return join ' ', map { "$_:" . ($n->{$_} // 0) }
        grep { ($n->{$_} // 0) != 1 } @j;
}

sub spooled {
    my $m = $t->metrics;
    return defined $m ? metric($m, 'civicgate_event_spool_events') // -1 : -1;
}

sub failed {
    my $m = $t->metrics;
    return defined $m ? metric($m, 'civicgate_events_total',
        result => 'failed') // 0 : 0;
}

ok($t->wait_until(sub {
    my $r = req('/consents/health', 'NIK-probe', method => 'PUT',
        body => '{}');
    $r->status == 201 || $r->status == 200
}, timeout => 10), 'the gateway reaches the cluster');

my @CIT = map { sprintf 'NIK-PART-%d-%d', $$, $_ } 1 .. 3;
for my $c (@CIT) {
    is(req('/consents/health', $c, method => 'PUT', body => '{}')->status,
        201, "$c grants health");
}
my ($X, $Y, $Z) = @CIT;

# two waves of requests, the second after the first failed (spooled
# behind it); a new journey each, so a journey names its request
sub waves {
    my ($plan) = @_;
    my %j;
    for my $wave (1, 2) {
        for my $p (@$plan) {
            my ($c, $mk) = @$p;
            my $j = $mk->();
            is(req('/clinic/', $c, journey => $j)->status, 200,
                "wave $wave: a request of $c") or next;
            push @{ $j{$c} }, $j;
        }
        sleep 0.4;
    }
    return \%j;
}

###########################################################################
# A. a citizen's part refused

{
    my ($xidx) = keys_of($X);
    is($C->query_key($xidx, 'SET', $xidx, 'not a sorted set'), 'OK',
        "A: the journey index of $X made a string");
    my $f0 = failed();
    my $J = waves([ map { ([ $X, sub { journey() } ],
        [ $Y, sub { journey() } ]) } 1 .. 3 ]);
    my @jx = @{ $J->{$X} // [] };
    my @jy = @{ $J->{$Y} // [] };
    sleep 1;

    cmp_ok(failed() - $f0, '>=', 2, 'A: the citizen\'s calls failed and '
        . 'were retried');
    cmp_ok(spooled(), '>', 0, 'A: its events wait in the spool');
    my $n = in_streams();
    is(not_once($n, @jx), '', 'A: its ' . @jx . ' events in their '
        . 'streams once each, meanwhile');
    is(not_once({ map { $_ => timeline_len($_) } @jx }, @jx), '',
        'A: and in their timelines once each');
    is(not_once($n, @jy), '', 'A: the other citizen\'s ' . @jy . ' events '
        . 'once each');
    is(not_once(uses_of($Y), @jy), '', 'A: its uses once each');
    my $iy = indexed($Y);
    is(scalar(grep { $iy->{$_} } @jy), scalar @jy, 'A: its index complete');

    is($C->query_key($xidx, 'DEL', $xidx), 1, 'A: the index repaired');
    ok($t->wait_until(sub { spooled() == 0 }, timeout => 5),
        'A: the spool is empty');
    my $ix = indexed($X);
    is(scalar(grep { $ix->{$_} } @jx), scalar @jx,
        'A: the citizen\'s index holds its journeys');
    is(not_once(uses_of($X), @jx), '', 'A: its data-use log one use per '
        . 'request');
    $n = in_streams();
    is(not_once($n, @jx, @jy), '', 'A: no event written to its stream '
        . 'again');
    is(not_once({ map { $_ => timeline_len($_) } @jx }, @jx), '',
        'A: nor to its timeline');
}

###########################################################################
# B. a shard's call refused

{
    my $bad = shard(journey());
    my $key = stream($bad);
    $C->query_key($key, 'DEL', $key);
    is($C->query_key($key, 'SET', $key, 'not a stream'), 'OK',
        "B: the stream of shard $bad made a string");
    my $f0 = failed();
    my $J = waves([ map { ([ $Z, sub { journey($bad) } ],
        [ $Z, sub { journey(undef, $bad) } ],
        [ $Y, sub { journey(undef, $bad) } ]) } 1 .. 2 ]);
    my @jz = @{ $J->{$Z} // [] };
    my @stuck = grep { shard($_) == $bad } @jz;
    my @ok = ((grep { shard($_) != $bad } @jz), @{ $J->{$Y} // [] });
    sleep 1;

    cmp_ok(failed() - $f0, '>=', 2, 'B: the shard\'s calls failed and were '
        . 'retried');
    cmp_ok(spooled(), '>', 0, 'B: its events wait in the spool');
    my $n = in_streams();
    is(not_once($n, @ok), '', 'B: the ' . @ok . ' events of other shards '
        . 'once each, meanwhile');
    is(scalar(grep { $n->{$_} } @stuck), 0, 'B: none of the ' . @stuck
        . ' of the refused shard');
    is(not_once(uses_of($Z), @jz), '', 'B: the citizen\'s data-use log: '
        . 'each request\'s use once, the refused shard\'s too');

    is($C->query_key($key, 'DEL', $key), 1, 'B: the stream repaired');
    ok($t->wait_until(sub { spooled() == 0 }, timeout => 5),
        'B: the spool is empty');
    $n = in_streams();
    is(not_once($n, @stuck, @ok), '', 'B: every event once in its stream');
    is(not_once(uses_of($Z), @jz), '', 'B: each use still once');
    my $iz = indexed($Z);
    is(scalar(grep { $iz->{$_} } @jz), scalar @jz,
        'B: the citizen\'s index holds its journeys');
}

my $m = $t->metrics;
is(metric($m, 'civicgate_events_total', result => 'dropped') // 0, 0,
    'none dropped');
$t->allow_log(qr/WRONGTYPE/);
$t->done_testing;
