package Civicgate::Cluster;

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

=head1 NAME

Civicgate::Cluster - a Redis Cluster on loopback for the tests

=head1 SYNOPSIS

    use Civicgate::Test qw(:all);
    use Civicgate::Cluster;

    my $t = Civicgate::Test->new;
    my $C = Civicgate::Cluster->start($t, masters => 3, replicas => 1);
    # %%PORT_cluster1%% .. %%PORT_cluster6%% in nginx.conf, or:
    my $seeds = join ' ', $C->seed_urls;  # redis://127.0.0.1:P ...
    my $slot = $C->key_slot('cg:{events:0}');
    my $port = $C->master_of_slot($slot);
    $C->query($port, 'XLEN', 'cg:{events:0}');
    $C->migrate_slot($slot, $port, $other, pause => sub { ... });
    $C->failover($C->replica_of($port));  # CLUSTER FAILOVER, waits
    my $new = $C->kill_master($port);     # SIGKILL, waits for promotion
    $C->restart($port);                   # rejoins as a replica

=head1 DESCRIPTION

Starts C<masters * (1 + replicas)> C<redis-server --cluster-enabled yes>
on the test context's ports C<cluster1>, C<cluster2>, ... (each with its
own C<nodes-PORT.conf> in the top directory, no persistence, and its
cluster bus on a free port of its own, C<cluster-bus-PORT>), joins them
with C<redis-cli --cluster create ... --cluster-replicas N --cluster-yes>
and returns once every node reports C<cluster_state:ok>, every node
agrees on the slot map and on who replicates whom, and every replica's
link to its master is up.  Options: C<node_timeout> (milliseconds,
default 1000, so a failover takes about 2 s), C<server_args> (more
arguments for every server), C<timeout> (seconds to wait for the
cluster, default 30).  Replicas may always fail over
(C<cluster-replica-validity-factor 0>) and do not migrate between
masters (C<cluster-allow-replica-migration no>), so the roles in a test
change only through the methods below.

Every server is a daemon of the test context: stopped by pid when the
test ends, also when it dies.

=head1 METHODS

    $C->ports                   every node's port, started or not
    $C->live_ports              the nodes running now
    $C->seed_urls               redis://127.0.0.1:P of the current masters
    $C->master_ports            the current masters' ports (ascending)
    $C->replica_of($master)     its replica's port (list context: all)
    $C->master_of($replica)     the port it replicates
    $C->master_of_slot($slot)   the port serving the slot, as nodes agree
    $C->key_slot($key)          CLUSTER KEYSLOT
    $C->query($port, @cmd)      one command to one node, its exact reply
                                (Civicgate::Test's RESP client; errors as
                                Civicgate::Test::RedisError, a failed
                                connection as undef)
    $C->query_key($key, @cmd)   @cmd to the master of $key's slot,
                                following MOVED and ASK
    $C->query_all_masters(@cmd) { port => reply } over the masters
    $C->cli(@args)              redis-cli --raw @args, its output
    $C->nodes($port)            CLUSTER NODES of a node, parsed: hash ref
                                port => { id, flags => {..}, master
                                (port), slots => [[lo, hi], ...] }
    $C->migrate_slot($slot, $from, $to, pause => $code, first => $n,
                     batch => 10)
                                moves a slot and its keys (the resharding
                                protocol); $code->($C, $moved, $left) runs
                                once after the first $n keys moved (default
                                half of them), before the slot changes
                                owner; returns the number of keys moved
    $C->failover($replica)      CLUSTER FAILOVER; returns the seconds until
                                every node names the replica master
    $C->kill_master($port)      SIGKILL; returns the promoted replica's port
                                (list context: also the seconds it took)
    $C->restart($port)          starts a killed node again; returns when it
                                is a replica in sync, as every node agrees
    $C->wait_stable             waits until the nodes agree again

=cut

use strict;
use warnings;

use Carp qw(croak);
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
use Civicgate::Test ();

my $SLOTS = 16384;

sub start {
    my ($class, $t, %o) = @_;
    my $server = $Civicgate::Test::REDIS_SERVER;
    croak 'redis-server not found' unless $server;
    croak 'redis-cli not found' unless $Civicgate::Test::REDIS_CLI;
    my $masters = $o{masters} // 3;
    my $replicas = $o{replicas} // 1;
    croak 'a cluster needs 3 masters or more' if $masters < 3;
    my $self = bless {
        t => $t,
        server => $server,
        node_timeout => $o{node_timeout} // 1000,
        server_args => $o{server_args} // [],
        timeout => $o{timeout} // 30,
        replicas => $replicas,
        pids => {},
        ports => [],
    }, $class;

    my $n = $masters * (1 + $replicas);
    push @{ $self->{ports} }, $t->port("cluster$_") for 1 .. $n;
    $self->_server($_) for @{ $self->{ports} };
    for my $p (@{ $self->{ports} }) {
        $t->wait_until(sub { my $r = $self->query($p, 'PING');
                defined $r && !ref $r && $r eq 'PONG' },
            timeout => 10, interval => 0.05)
            or croak "cluster node $p did not start:\n" . $self->_log($p);
    }

    my ($rc, $out) = $self->_run_cli($self->{timeout}, '--cluster', 'create',
        (map { "127.0.0.1:$_" } @{ $self->{ports} }),
        '--cluster-replicas', $replicas, '--cluster-yes');
    croak "redis-cli --cluster create failed ($rc):\n$out" if $rc != 0;

    $self->wait_stable(masters => $masters);
    return $self;
}

sub _server {
    my ($self, $port) = @_;
    my $t = $self->{t};
    my $top = $t->topdir;
    # the bus port is a free port of its own: port + 10000, Redis's
    # default, may be an ephemeral port in use on a busy machine
    $self->{bus}{$port} //= $t->port("cluster-bus-$port");
    my $pid = $t->run_daemon_logged("$top/cluster-$port.log",
        $self->{server}, '--port', $port, '--bind', '127.0.0.1',
        '--cluster-enabled', 'yes', '--cluster-port', $self->{bus}{$port},
        '--cluster-config-file', "nodes-$port.conf",
        '--cluster-node-timeout', $self->{node_timeout},
        '--cluster-replica-validity-factor', 0,
        '--cluster-allow-replica-migration', 'no',
        '--save', '', '--appendonly', 'no', '--dir', $top,
        '--dbfilename', "dump-$port.rdb", '--protected-mode', 'no',
        '--daemonize', 'no', @{ $self->{server_args} });
    $self->{pids}{$port} = $pid;
    return $pid;
}

sub _log {
    my ($self, $port) = @_;
    return $self->{t}->read_file($self->{t}->topdir . "/cluster-$port.log")
        // '';
}

# redis-cli with a deadline: (exit code, output)
sub _run_cli {
    my ($self, $timeout, @args) = @_;
    my $t = $self->{t};
    my $out = $t->topdir . '/cluster-cli.out';
    unlink $out;
    my $pid = $t->run_daemon_logged($out, $Civicgate::Test::REDIS_CLI,
        @args);
    my $end = time + $timeout;
    my $rc;
    while (1) {
        if (waitpid($pid, WNOHANG) == $pid) {
            $rc = $? >> 8;
            last;
        }
        if (time >= $end) {
            kill 'KILL', $pid;
            waitpid($pid, 0);
            $rc = -1;
            last;
        }
        sleep 0.05;
    }
    $t->forget_daemon($pid);
    return ($rc, $t->read_file($out) // '');
}

sub cli {
    my ($self, @args) = @_;
    my ($rc, $out) = $self->_run_cli(30, '--raw', @args);
    $out =~ s/\n\z//;
    return $out;
}

###########################################################################
# what the nodes say

sub ports { @{ $_[0]{ports} } }

sub live_ports {
    my ($self) = @_;
    return grep { $self->{pids}{$_} } @{ $self->{ports} };
}

sub query {
    my ($self, $port, @cmd) = @_;
    return scalar eval {
        $self->{t}->redis_query({ port => $port, timeout => 5,
            auth => undef }, @cmd);
    };
}

sub _is_error { ref $_[0] eq 'Civicgate::Test::RedisError' }

# CLUSTER NODES of one node: port => { id, flags, master, slots }
sub nodes {
    my ($self, $port) = @_;
    my $r = $self->query($port, 'CLUSTER', 'NODES');
    return undef if !defined $r || ref $r;
    my (%by_id, %n);
    for my $l (split /\n/, $r) {
        my ($id, $addr, $flags, $master, undef, undef, undef, $link, @s)
            = split ' ', $l;
        next unless defined $link;
        my ($p) = $addr =~ /:(\d+)@/ or next;
        my @slots;
        for my $s (@s) {
            next if $s =~ /^\[/;        # a slot being migrated or imported
            my ($lo, $hi) = split /-/, $s;
            push @slots, [ $lo, $hi // $lo ];
        }
        $by_id{$id} = $p;
        $n{$p} = { id => $id, flags => { map { $_ => 1 } split /,/, $flags },
            master_id => $master, link => $link, slots => \@slots };
    }
    for my $v (values %n) {
        my $m = delete $v->{master_id};
        $v->{master} = $m eq '-' ? undef : $by_id{$m};
    }
    return \%n;
}

# a node's view reduced to what must agree: slot owners, replicas'
# masters, healthy nodes only
sub _signature {
    my ($view) = @_;
    my @s;
    for my $p (sort { $a <=> $b } keys %$view) {
        my $v = $view->{$p};
        next if $v->{flags}{fail} || $v->{flags}{'fail?'}
            || $v->{flags}{handshake} || $v->{flags}{noaddr};
        if ($v->{flags}{master}) {
            push @s, "M$p:" . join ',', map { "$_->[0]-$_->[1]" }
                sort { $a->[0] <=> $b->[0] } @{ $v->{slots} };
        } else {
            push @s, "R$p>" . ($v->{master} // '?');
        }
    }
    return join ' ', @s;
}

sub _covered {
    my ($view) = @_;
    my $n = 0;
    for my $v (values %$view) {
        next unless $v->{flags}{master} && !$v->{flags}{fail};
        $n += $_->[1] - $_->[0] + 1 for @{ $v->{slots} };
    }
    return $n;
}

# one consistent view of the live nodes, or undef; $check->($view) may
# demand more
sub _agreed_view {
    my ($self, $check) = @_;
    my ($sig, $view);
    my @live = $self->live_ports;
    for my $p (@live) {
        my $info = $self->query($p, 'CLUSTER', 'INFO');
        return undef unless defined $info && !ref $info
            && $info =~ /cluster_state:ok/;
        my $v = $self->nodes($p) or return undef;
        # every live node known, none failing, in this node's view
        for my $q (@live) {
            my $w = $v->{$q} or return undef;
            return undef if $w->{flags}{fail} || $w->{flags}{'fail?'}
                || $w->{flags}{handshake};
        }
        my $s = _signature($v);
        return undef if defined $sig && $s ne $sig;
        ($sig, $view) = ($s, $v);
    }
    return undef unless $view && _covered($view) == $SLOTS;
    for my $p (@live) {
        next if $view->{$p}{flags}{master};
        my $info = $self->query($p, 'INFO', 'replication');
        return undef unless defined $info && !ref $info
            && $info =~ /master_link_status:up/
            && $info =~ /master_sync_in_progress:0/;
    }
    return undef if $check && !$check->($view);
    $self->{view} = $view;
    return $view;
}

sub wait_stable {
    my ($self, %o) = @_;
    my $check = $o{check};
    if (my $m = $o{masters}) {
        my $c = $check;
        $check = sub {
            my ($v) = @_;
            my @m = grep { $v->{$_}{flags}{master} && @{ $v->{$_}{slots} } }
                keys %$v;
            return @m == $m && (!$c || $c->($v));
        };
    }
    my $t0 = time;
    $self->{t}->wait_until(sub { $self->_agreed_view($check) },
        timeout => $o{timeout} // $self->{timeout}, interval => 0.1)
        or croak 'the cluster did not settle in '
            . sprintf('%.1f s', time - $t0) . ":\n" . $self->_diag;
    return time - $t0;
}

sub _diag {
    my ($self) = @_;
    my $d = '';
    for my $p ($self->live_ports) {
        my $info = $self->query($p, 'CLUSTER', 'INFO') // 'no answer';
        my ($state) = ref $info ? ("$info") : $info =~ /(cluster_state:\w+)/;
        my $nodes = $self->query($p, 'CLUSTER', 'NODES') // '';
        $d .= "node $p: " . ($state // '?') . "\n$nodes\n";
    }
    return $d;
}

# the last agreed view, refreshed
sub _view {
    my ($self) = @_;
    return $self->_agreed_view // $self->{view}
        // croak 'no view of the cluster';
}

sub master_ports {
    my ($self) = @_;
    my $v = $self->_view;
    return sort { $a <=> $b } grep {
        $v->{$_}{flags}{master} && !$v->{$_}{flags}{fail}
            && @{ $v->{$_}{slots} }
    } keys %$v;
}

sub seed_urls { map { "redis://127.0.0.1:$_" } $_[0]->master_ports }

sub replica_of {
    my ($self, $master) = @_;
    my $v = $self->_view;
    my @r = sort { $a <=> $b } grep {
        !$v->{$_}{flags}{master} && !$v->{$_}{flags}{fail}
            && ($v->{$_}{master} // 0) == $master
    } keys %$v;
    return wantarray ? @r : $r[0];
}

sub master_of {
    my ($self, $replica) = @_;
    my $v = $self->_view;
    return $v->{$replica} ? $v->{$replica}{master} : undef;
}

sub master_of_slot {
    my ($self, $slot) = @_;
    my $v = $self->_view;
    for my $p (keys %$v) {
        next unless $v->{$p}{flags}{master} && !$v->{$p}{flags}{fail};
        for my $r (@{ $v->{$p}{slots} }) {
            return $p if $slot >= $r->[0] && $slot <= $r->[1];
        }
    }
    return undef;
}

sub key_slot {
    my ($self, $key) = @_;
    for my $p ($self->live_ports) {
        my $r = $self->query($p, 'CLUSTER', 'KEYSLOT', $key);
        return $r if defined $r && !ref $r;
    }
    croak 'CLUSTER KEYSLOT: no node answers';
}

sub query_key {
    my ($self, $key, @cmd) = @_;
    my $port = $self->master_of_slot($self->key_slot($key));
    my $asking = 0;
    for (1 .. 5) {
        my @r = $self->{t}->redis_pipeline({ port => $port, timeout => 5,
            auth => undef }, ($asking ? ([ 'ASKING' ]) : ()), [ @cmd ]);
        my $r = $r[-1];
        return $r unless _is_error($r)
            && $r->{message} =~ /^(MOVED|ASK) \d+ [\d.]+:(\d+)/;
        ($asking, $port) = ($1 eq 'ASK', $2);
    }
    croak "query_key $key: too many redirections";
}

sub query_all_masters {
    my ($self, @cmd) = @_;
    return { map { $_ => $self->query($_, @cmd) } $self->master_ports };
}

###########################################################################
# resharding, failover

sub _id {
    my ($self, $port) = @_;
    my $r = $self->query($port, 'CLUSTER', 'MYID');
    croak "CLUSTER MYID of $port: " . ($r // 'no answer')
        if !defined $r || ref $r;
    return $r;
}

sub _ok {
    my ($self, $port, @cmd) = @_;
    my $r = $self->query($port, @cmd);
    croak "@cmd on $port: " . ($r // 'no answer')
        unless defined $r && !ref $r && $r eq 'OK';
    return $r;
}

sub migrate_slot {
    my ($self, $slot, $from, $to, %o) = @_;
    my $batch = $o{batch} // 10;
    my ($from_id, $to_id) = ($self->_id($from), $self->_id($to));

    # the order of the resharding protocol: importing before migrating
    $self->_ok($to, 'CLUSTER', 'SETSLOT', $slot, 'IMPORTING', $from_id);
    $self->_ok($from, 'CLUSTER', 'SETSLOT', $slot, 'MIGRATING', $to_id);

    my ($moved, $paused) = (0, !$o{pause});
    while (1) {
        my $keys = $self->query($from, 'CLUSTER', 'GETKEYSINSLOT', $slot,
            $paused ? $batch : $o{first} // _half($self->query($from,
                'CLUSTER', 'COUNTKEYSINSLOT', $slot)));
        croak "GETKEYSINSLOT $slot on $from: " . ($keys // 'no answer')
            unless ref $keys eq 'ARRAY';
        if (@$keys) {
            my $r = $self->query($from, 'MIGRATE', '127.0.0.1', $to, '', 0,
                5000, 'KEYS', @$keys);
            croak "MIGRATE to $to: " . ($r // 'no answer')
                unless defined $r && !ref $r && $r =~ /^(OK|NOKEY)$/;
            $moved += @$keys;
        }
        unless ($paused) {
            # some keys moved, the rest not yet: ASK and TRYAGAIN time
            $paused = 1;
            my $left = $self->query($from, 'CLUSTER', 'COUNTKEYSINSLOT',
                $slot);
            $o{pause}->($self, $moved, $left);
            next;
        }
        last unless @$keys;
    }

    # the new owner first, then the old one, then everybody else
    my @order = ($to, $from, grep { $_ != $to && $_ != $from }
        $self->master_ports);
    $self->_ok($_, 'CLUSTER', 'SETSLOT', $slot, 'NODE', $to_id) for @order;
    # a configuration epoch of its own for the new owner's claim, so that a
    # later failover cannot lose the slot to an epoch collision
    $self->query($to, 'CLUSTER', 'BUMPEPOCH');
    $self->wait_stable(check => sub {
        my ($v) = @_;
        grep { $slot >= $_->[0] && $slot <= $_->[1] }
            @{ $v->{$to}{slots} };
    });
    return $moved;
}

sub _half {
    my ($n) = @_;
    $n = 0 unless defined $n && !ref $n;
    return $n > 1 ? int($n / 2) : 1;
}

sub failover {
    my ($self, $replica, %o) = @_;
    my $old = $self->master_of($replica) // croak "$replica is no replica";
    my $t0 = time;
    $self->_ok($replica, 'CLUSTER', 'FAILOVER');
    $self->wait_stable(timeout => $o{timeout}, check => sub {
        my ($v) = @_;
        return $v->{$replica}{flags}{master}
            && ($v->{$old}{master} // 0) == $replica;
    });
    return time - $t0;
}

sub kill_master {
    my ($self, $port, %o) = @_;
    my @replicas = $self->replica_of($port);
    croak "$port has no replica" unless @replicas;
    my $pid = delete $self->{pids}{$port} or croak "$port is not running";
    my $t0 = time;
    kill 'KILL', $pid;
    waitpid($pid, 0);
    $self->{t}->forget_daemon($pid);
    my $new;
    $self->wait_stable(timeout => $o{timeout}, check => sub {
        my ($v) = @_;
        ($new) = grep { $v->{$_}{flags}{master} && @{ $v->{$_}{slots} } }
            @replicas;
        return defined $new && $v->{$port}
            && !@{ $v->{$port}{slots} };
    });
    my $s = time - $t0;
    return wantarray ? ($new, $s) : $new;
}

sub restart {
    my ($self, $port, %o) = @_;
    croak "$port is running" if $self->{pids}{$port};
    $self->_server($port);
    $self->{t}->wait_port($port, 10)
        or croak "cluster node $port did not start:\n" . $self->_log($port);
    $self->wait_stable(timeout => $o{timeout}, check => sub {
        my ($v) = @_;
        return !$v->{$port}{flags}{master} && defined $v->{$port}{master};
    });
    return $port;
}

1;
