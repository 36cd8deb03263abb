#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Self-test of t/lib/Civicgate/Cluster.pm, without nginx: a cluster of 3
# masters and 3 replicas whose nodes agree on a map covering the 16384
# slots; migrate_slot moves a slot and its keys (ASK, ASKING and TRYAGAIN
# seen in its pause, MOVED after it); failover and kill_master promote the
# replica, keeping the data; a killed master comes back as a replica.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use Civicgate::Test qw(:all);
use Civicgate::Cluster;

my $t = Civicgate::Test->new(nginx => 0);
my $t0 = time;

my $C = Civicgate::Cluster->start($t, masters => 3, replicas => 1);
diag(sprintf 'cluster up in %.1f s', time - $t0);

###########################################################################
# the map

my @m = $C->master_ports;
is(scalar @m, 3, '3 masters');
is(scalar(map { $C->replica_of($_) } @m), 3, 'one replica each');
my %owner;
my $dup = 0;
for my $p (@m) {
    for my $r (@{ $C->nodes($p)->{$p}{slots} }) {
        $dup += exists $owner{$_} for $r->[0] .. $r->[1];
        $owner{$_} = $p for $r->[0] .. $r->[1];
    }
}
is(scalar keys %owner, 16384, 'the masters serve the 16384 slots');
is($dup, 0, 'no slot served twice');
is((grep { $C->master_of_slot($_) != $owner{$_} } 0, 5000, 10000, 16383),
    0, 'master_of_slot agrees with the masters');
for my $p ($C->ports) {
    like($C->query($p, 'CLUSTER', 'INFO'), qr/cluster_state:ok/,
        "node $p: cluster_state:ok");
}
is_deeply([ sort { $a <=> $b } map { $_ =~ /:(\d+)$/ } $C->seed_urls ],
    \@m, 'seed URLs are the masters');

# values every Redis Cluster client agrees on
is($C->key_slot('foo'), 12182, 'key_slot: foo');
is($C->key_slot('{user1000}.following'), $C->key_slot('user1000'),
    'key_slot: a hash tag');

###########################################################################
# migrate_slot

my $slot = $C->key_slot('foo');
my $from = $C->master_of_slot($slot);
my ($to) = grep { $_ != $from } @m;
my @keys = map { "{foo}k$_" } 1 .. 10;
for my $k (@keys) {
    is($C->query($from, 'SET', $k, "v-$k"), 'OK', "SET $k") or last;
}
is($C->query_all_masters('DBSIZE')->{$from}, 10, 'the keys on the owner');

sub on {
    my ($port, $key) = @_;
    my $r = $C->query($port, 'EXISTS', $key);
    return defined $r && !ref $r && $r == 1;
}

my %seen;
my $moved = $C->migrate_slot($slot, $from, $to, pause => sub {
    my ($c, $n, $left) = @_;
    $seen{moved} = $n;
    $seen{left} = $left;
    # at the old owner, a key already moved is ASKed for
    my ($gone) = grep { !on($from, $_) } @keys;
    my ($here) = grep { on($from, $_) } @keys;
    $seen{ask} = $c->query($from, 'GET', $gone);
    my @r = $t->redis_pipeline({ port => $to, auth => undef },
        [ 'ASKING' ], [ 'GET', $gone ]);
    $seen{asking} = $r[1];
    @r = $t->redis_pipeline({ port => $to, auth => undef },
        [ 'ASKING' ], [ 'MGET', $gone, $here ]);
    $seen{tryagain} = $r[1];
    $seen{routed} = $c->query_key($gone, 'GET', $gone);
    $seen{gone} = $gone;
});
ok($seen{moved} > 0 && $seen{left} > 0,
    "pause after some keys moved ($seen{moved} moved, $seen{left} left)");
like($seen{ask}, qr/^ASK $slot 127\.0\.0\.1:$to$/,
    'pause: a moved key is ASKed for at the old owner');
is($seen{asking}, "v-$seen{gone}", 'pause: ASKING, the new owner serves it');
like($seen{tryagain}, qr/^TRYAGAIN/,
    'pause: keys on both sides are TRYAGAIN');
is($seen{routed}, "v-$seen{gone}", 'pause: query_key follows the ASK');
is($moved, 10, 'migrate_slot moved the 10 keys');
is($C->master_of_slot($slot), $to, 'the slot is served by the new owner');
for my $p ($C->ports) {
    my $owner = grep { $slot >= $_->[0] && $slot <= $_->[1] }
        @{ $C->nodes($p)->{$to}{slots} };
    ok($owner, "node $p names the new owner");
}
is($C->query($from, 'CLUSTER', 'COUNTKEYSINSLOT', $slot), 0,
    'none left on the old owner');
is($C->query($to, 'CLUSTER', 'COUNTKEYSINSLOT', $slot), 10,
    'all on the new owner');
is($C->query($to, 'GET', $keys[0]), "v-$keys[0]", 'a value moved');
like($C->query($from, 'GET', $keys[0]), qr/^MOVED $slot 127\.0\.0\.1:$to$/,
    'the old owner answers MOVED');
is($C->query_key($keys[9], 'GET', $keys[9]), "v-$keys[9]",
    'query_key finds it');

###########################################################################
# failover

my $replica = $C->replica_of($to);
is($C->query($to, 'WAIT', 1, 2000), 1, 'the replica has the keys');
my $s = $C->failover($replica);
diag(sprintf 'CLUSTER FAILOVER: %.2f s', $s);
ok((grep { $_ == $replica } $C->master_ports), 'failover: replica promoted');
is($C->master_of($to), $replica, 'failover: the old master replicates it');
is($C->master_of_slot($slot), $replica, 'failover: it serves the slot');
is($C->query($replica, 'GET', $keys[3]), "v-$keys[3]", 'failover: data kept');

###########################################################################
# kill_master, restart

# a master the failover above left alone, with the replica it started
# with (the node demoted above may still be resynchronising)
my ($key) = grep {
    my $m = $C->master_of_slot($C->key_slot($_));
    $m != $replica && $m != $to;
} map { "{s$_}x" } 0 .. 99;
my $victim = $C->master_of_slot($C->key_slot($key));
my $heir = $C->replica_of($victim);
is($C->query($victim, 'SET', $key, 'kept'), 'OK', 'a key written');
is($C->query($victim, 'WAIT', 1, 2000), 1, 'and replicated');
# the replica to be promoted holds it itself (read with READONLY)
ok($t->wait_until(sub {
    my @r = eval { $t->redis_pipeline({ port => $heir, timeout => 5,
        auth => undef }, [ 'READONLY' ], [ 'GET', $key ]) };
    return defined $r[-1] && !ref $r[-1] && $r[-1] eq 'kept';
}, timeout => 5, interval => 0.1), "the replica $heir holds it")
    or diag $C->query($heir, 'INFO', 'replication') // '';
my ($new, $secs) = $C->kill_master($victim);
diag(sprintf 'SIGKILL to promotion: %.2f s', $secs);
is($new, $heir, 'kill_master: the replica is promoted');
ok(!(grep { $_ == $victim } $C->live_ports), 'the killed node is down');
is($C->master_of_slot($C->key_slot($key)), $heir, 'kill_master: it serves the slots');
# (a just promoted replica on a loaded machine may answer late: asked
# again, for 5 s at most)
my $kept;
$t->wait_until(sub {
    $kept = eval { $C->query_key($key, 'GET', $key) };
    defined $kept && !ref $kept;
}, timeout => 5, interval => 0.2);
is($kept, 'kept', 'kill_master: data kept')
    or diag explain($kept), $C->query($heir, 'INFO', 'replication') // '';
for my $p ($C->live_ports) {
    like($C->query($p, 'CLUSTER', 'INFO'), qr/cluster_state:ok/,
        "after the kill, node $p: cluster_state:ok");
}

$C->restart($victim);
is($C->master_of($victim), $heir, 'restart: rejoins as the new replica');
is(scalar(() = $C->master_ports), 3, 'restart: still 3 masters');
like($C->query($victim, 'INFO', 'replication'),
    qr/master_link_status:up/, 'restart: in sync');

my $total = time - $t0;
ok($total < 30, sprintf 'all within 30 s (%.1f s)', $total);

$t->done_testing;
