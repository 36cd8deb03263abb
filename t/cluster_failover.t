#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Failovers of a Redis Cluster (3 masters, 1 replica each) under traffic,
# "mode=cluster" with 16 event shards, 2 workers, a second gateway b for
# changes made elsewhere:
#
# A. CLUSTER FAILOVER on the replica of the master that holds the status
#    history (and shards of the traffic): status changes and journey steps
#    made before, during and after the switch reach live Server-Sent
#    Events clients, and clients that resume with Last-Event-ID get exactly
#    the ones they missed; a withdrawal made through gateway b right after
#    the switch (stored on the promoted master) is enforced on both
#    workers of gateway a at once, through the invalidation, not the
#    cache's ttl= (30 s).
# B. SIGKILL of the master the workers' subscriber connections use (found
#    with CLIENT LIST): it is first stopped (SIGSTOP) for the moment a
#    withdrawal is published through gateway b, so that the invalidation
#    is lost with the node; the cached grant still answers until the
#    subscribers move to the next seed and flush the cache, never after.
#    The journey followed on that master's shard resumes without a gap
#    (a client answered 503 while the workers have not yet read the new
#    slot map comes back 200 ms later, as after its retry interval).
# C. Journey events of traffic running through both (a new journey per
#    request, so an event names its request): every request's event in
#    the shard streams, none lost, none unknown; the duplicates (same eid)
#    only of events logged during a switch, each written twice at most (a
#    batch that failed writes again only its failed calls' parts: twice is
#    a call executed whose reply was lost); events of the killed master's
#    shards spooled and written once its replica took over.  The times
#    (switch, events flowing again, consent enforced) and the duplicates
#    are printed.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use POSIX qw(floor);
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(json_of admin_service);
use Civicgate::Cluster;
use Civicgate::Events qw(event_shard event_stream);

my $T0 = time;
my $t = Civicgate::Test->new;
my $NS = 16;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

my $C = Civicgate::Cluster->start($t, masters => 3, replicas => 1);

sub shard { event_shard($_[0], $NS) }
sub stream { event_stream($_[0]) }
sub master_of_key { $C->master_of_slot($C->key_slot($_[0])) }
sub shard_master { master_of_key(stream($_[0])) }

# A: the master of the status history; B: another one, the first seed,
# whose node the subscribers use
my $MA = master_of_key('cg:{status}:history');
my ($MB) = grep { $_ != $MA } $C->master_ports;
my @SEEDS = ($MB, grep { $_ != $MB } $C->master_ports);
my %SHARDS_OF;
push @{ $SHARDS_OF{ shard_master($_) } }, $_ for 0 .. $NS - 1;
note("masters @SEEDS; A: $MA (shards @{ $SHARDS_OF{$MA} // [] }), "
    . "B: $MB (shards @{ $SHARDS_OF{$MB} // [] })");

my $CONF = <<'EOF';
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis @SEEDS@ mode=cluster timeout=1s;
    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
    }
    @CACHE@

    server {
        listen 127.0.0.1:%%PORT_@P@%% reuseport;
        server_name localhost;

        civicgate_journey on secure=off;
        civicgate_citizen $http_x_citizen_id;
        add_header X-Pid $pid always;

        location /free/ {
            civicgate_service free;
            proxy_pass http://127.0.0.1:%%PORT_@P@back%%;
        }
        location /tax/ {
            civicgate_events off;
            civicgate_service tax;
            return 200 "tax\n";
        }
        location /svc/ {
            civicgate_events off;
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_@P@back%%;
        }
        location /consents/ {
            civicgate_events off;
            civicgate_consent_api;
        }
        location /status/ {
            civicgate_events off;
            civicgate_status;
            civicgate_status_heartbeat 1s;
        }
        location /civicgate/admin/ {
            civicgate_events off;
            civicgate_admin;
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_@P@back%%;
        civicgate_journey off;
        location / { return 200 "backend\n"; }
    }
EOF

my $B = $t->nginx('b');
for my $g ([ $t, 0, 2, 'civicgate_consent_cache zone=consent:1m ttl=30s '
        . 'negative_ttl=30s;' ], [ $B, 'b', 1, '' ]) {
    my ($n, $p, $w, $cache) = @$g;
    (my $c = $CONF) =~ s/\@P\@/$p/g;
    $c =~ s/\@CACHE\@/$cache/;
    $c =~ s/\@SEEDS\@/join ' ', map { "redis:\/\/127.0.0.1:$_" } @SEEDS/e;
    $n->write_nginx_conf($c, worker_processes => $w);
}
$t->run;
$B->run;

###########################################################################
# helpers

sub req {
    my ($path, %o) = @_;
    my $n = $o{gw} // $t;
    return $n->request($path, method => $o{method} // 'GET',
        port => $n == $t ? $t->port(0) : $t->port('b'), timeout => 5,
        headers => [ ($o{citizen} ? ('X-Citizen-Id' => $o{citizen}) : ()),
            ($o{journey} ? ('X-Journey-ID' => $o{journey}) : ()) ],
        (defined $o{body} ? (body => $o{body}) : ()));
}

# a citizen whose consent record is in a slot of that master (or not)
my $NCIT = 0;
sub citizen_on {
    my ($port, $not) = @_;
    while (1) {
        my $c = sprintf 'NIK-FO-%d-%d', $$, ++$NCIT;
        my $m = master_of_key('cg:{c:' . pseudonym($KEY, $c) . '}:consents');
        return $c if $not ? $m != $port : $m == $port;
    }
}

# a journey whose shard a master serves
sub journey_on {
    my ($port) = @_;
    while (1) {
        my $j = mint_journey_id($KEY);
        return $j if shard_master(shard($j)) == $port;
    }
}

# consent checks of a citizen until both workers answered; their statuses
sub both_workers {
    my ($cit) = @_;
    my %st;
    for (1 .. 40) {
        my $r = req('/svc/x', citizen => $cit);
        $st{ $r->header('X-Pid') // '?' } //= $r->status;
        last if keys %st >= 2;
    }
    return join ' ', map { $st{$_} } sort keys %st;
}

# the workers' subscriber connections: node port => number of them
sub subscribers {
    my %pid = map { $_ => 1 } $t->worker_pids;
    my %on;
    for my $p ($C->live_ports) {
        my $l = $C->query($p, 'CLIENT', 'LIST');
        next unless defined $l && !ref $l;
        for my $c (split /\n/, $l) {
            my ($pid) = $c =~ /\bname=civicgate-(\d+)\b/ or next;
            my ($sub) = $c =~ /\bsub=(\d+)/;
            $on{$p}++ if $pid{$pid} && $sub;
        }
    }
    return \%on;
}

sub admin_put {
    my ($state) = @_;
    my $r = admin_service($t, PUT => 'tax', { state => $state },
        timeout => 5);
    is($r->status, 200, "PUT tax $state") or diag $r->raw;
    return (json_of($r) // {})->{id} // '';
}

sub step {
    my ($j, $wait) = @_;
    my $r = req('/free/', journey => $j);
    is($r->status, 200, 'a step of the followed journey');
    # a journey is followed once its first step is stored
    ok($t->wait_until(sub { @{ timeline_ids($j) } }, timeout => 5),
        '  stored') if $wait;
}

sub sse {
    my ($path, $last) = @_;
    my $s = $t->sse_open($path,
        headers => [ defined $last ? ('Last-Event-ID' => $last) : () ]);
    return $s;
}

# a client resuming with Last-Event-ID; one that is answered 503 (the
# gateway has not read the new slot map yet) comes back 200 ms later, for
# 3 s at most; the 503s are counted in $$refused
sub resume {
    my ($path, $last, $refused) = @_;
    my $end = time + 3;
    while (1) {
        my $s = sse($path, $last);
        $s->wait_for(sub { $_[0]->head_done || $_[0]->closed }, 5);
        return $s if ($s->status // 0) != 503 || time > $end;
        $$refused++;
        $s->close;
        sleep 0.2;
    }
}

sub kinds { [ grep { ($_->{event} // '') eq $_[1] } @{ $_[0]->events } ] }
sub ids { [ map { $_->{id} } @{ $_[0] } ] }

# the timeline's step IDs (cluster mode: next to the shard's stream)
sub timeline_ids {
    my ($j) = @_;
    my $key = 'cg:{events:' . shard($j) . "}:timeline:$j";
    my $l = $C->query_key($key, 'LRANGE', $key, 0, -1);
    return [ map { (split / /)[0] } @{ ref $l eq 'ARRAY' ? $l : [] } ];
}

# a background client: requests one after the other until $stop exists;
# one line per answer (start, status, pid, journey, seconds taken)
sub start_client {
    my ($name, $path, $headers, $interval) = @_;
    my $file = $t->topdir . "/client-$name.txt";
    my $stop = $t->topdir . "/client-$name.stop";
    unlink $file, $stop;
    my $port = $t->port(0);
    my $pid = $t->run_daemon(sub {
        open my $fh, '>', $file or die "$file: $!";
        my $old = select $fh; $| = 1; select $old;
        my $end = time + 50;
        while (!-e $stop && time < $end) {
            my $t0 = time;
            my $r = parse_response(http_get($path, port => $port,
                headers => $headers, timeout => 5, quiet => 1));
            printf $fh "%.6f\t%d\t%s\t%s\t%.6f\n", $t0, $r->status,
                $r->header('X-Pid') // '', $r->header('X-Journey-ID') // '',
                time - $t0;
            sleep $interval if $interval;
        }
        close $fh;
    });
    return { pid => $pid, file => $file, stop => $stop };
}

sub stop_client {
    my ($c) = @_;
    open my $fh, '>', $c->{stop} or die "$c->{stop}: $!";
    close $fh;
    unless ($t->wait_until(sub {
        waitpid($c->{pid}, POSIX::WNOHANG()) == $c->{pid} }, timeout => 10))
    {
        kill 'KILL', $c->{pid};
        waitpid($c->{pid}, 0);
    }
    $t->forget_daemon($c->{pid});
    my @r;
    open $fh, '<', $c->{file} or return [];
    while (my $l = <$fh>) {
        chomp $l;
        my ($t0, $st, $pid, $j, $el) = split /\t/, $l;
        push @r, { t => $t0, status => $st, pid => $pid, journey => $j,
            elapsed => $el };
    }
    return \@r;
}

sub pid_of {
    my ($port) = @_;
    my $i = $C->query($port, 'INFO', 'server') // '';
    return $i =~ /process_id:(\d+)/ ? $1 : undef;
}

# the journey's timeline once it holds $n steps
sub timeline_of {
    my ($j, $n) = @_;
    my $tl = [];
    $t->wait_until(sub { $tl = timeline_ids($j); @$tl >= $n }, timeout => 5);
    return $tl;
}

###########################################################################
# the gateways reach the cluster; both subscribers on the first seed

ok($t->wait_until(sub {
    my $r = req('/consents/health', citizen => 'NIK-probe', method => 'PUT',
        body => '{}');
    $r->status == 201 || $r->status == 200
}, timeout => 10), 'gateway a reaches the cluster');
ok($t->wait_until(sub { req('/consents/', citizen => 'NIK-probe',
    gw => $B)->status == 200 }, timeout => 10), 'gateway b too');
my $subs;
ok($t->wait_until(sub { $subs = subscribers(); ($subs->{$MB} // 0) == 2 },
    timeout => 5), "both workers' subscribers on the first seed, $MB")
    or diag explain $subs;

my $load = start_client('load', '/free/', [], 0.002);
my ($W1, $K1) = (citizen_on($MA), citizen_on($MA));
my $W2 = citizen_on($MB, 'not');
for my $c ($W1, $K1, $W2) {
    is(req('/consents/health', citizen => $c, method => 'PUT',
        body => '{}')->status, 201, "$c grants health");
}

###########################################################################
# A. CLUSTER FAILOVER of the status history's master

my ($JA, @JA_IDS) = (journey_on($MA));
my ($TA0, $TA1);
{
    is(both_workers($W1), '200 200', 'A: the grant, cached, on both workers');
    step($JA, 'wait');
    my @live = (sse("/status/journeys/$JA"), sse('/status/'));
    my @back = (sse("/status/journeys/$JA"), sse('/status/'));
    sse_pump([ @live, @back ], 5, sub { !grep { !@{ $_->events } }
        @live, @back });
    step($JA);
    my $c1 = admin_put('degraded');
    sse_pump([ @live, @back ], 5, sub { !grep {
        !@{ kinds($_, 'step') } && !@{ kinds($_, 'service') } }
        @live, @back });
    my $last_step = ids(kinds($back[0], 'step'))->[-1];
    my $last_change = ids(kinds($back[1], 'service'))->[-1];
    ok($last_step && $last_change, 'the resuming clients saw a step and a '
        . 'change') or diag explain [ map { $_->events } @live, @back ];
    $_->close for @back;
    sleep 1;

    my $RA = $C->replica_of($MA);
    $TA0 = time;
    is($C->query($RA, 'CLUSTER', 'FAILOVER'), 'OK', "CLUSTER FAILOVER on $RA");
    # during the switch
    step($JA);
    my $c2 = admin_put('outage');
    $C->wait_stable(check => sub { my ($v) = @_;
        $v->{$RA}{flags}{master} && ($v->{$MA}{master} // 0) == $RA });
    $TA1 = time;
    note(sprintf 'A: the replica took over in %.2f s', $TA1 - $TA0);
    # after, on the promoted master
    step($JA);
    my $c3 = admin_put('maintenance');
    is(master_of_key('cg:{status}:history'), $RA,
        'the status history on the promoted master');

    my $k = 'cg:{c:' . pseudonym($KEY, $W1) . '}:consents';
    is(master_of_key($k), $RA, 'the citizen\'s consents on the promoted '
        . 'master');
    my $tw = time;
    is(req('/consents/health', citizen => $W1, method => 'DELETE',
        gw => $B)->status, 200, 'A: withdrawn through gateway b');
    my $st;
    ok($t->wait_until(sub { ($st = both_workers($W1)) eq '403 403' },
        timeout => 1, interval => 0.02), 'A: refused on both workers of '
        . 'gateway a') or diag "still $st";
    my $took = time - $tw;
    cmp_ok($took, '<', 1, sprintf 'A: within %.3f s of the withdrawal, not '
        . 'the cache ttl (30 s)', $took);
    diag(sprintf 'A: CLUSTER FAILOVER: %.2f s; a withdrawal on the promoted '
        . 'master refused on both workers %.3f s later', $TA1 - $TA0, $took);
    is(both_workers($K1), '200 200', 'A: another citizen\'s grant stands');

    # resume, and the live clients
    my $refused = 0;
    @back = (resume("/status/journeys/$JA", $last_step, \$refused),
        resume('/status/', $last_change, \$refused));
    is($refused, 0, 'A: the resuming clients answered at once');
    my $tl = timeline_of($JA, 4);
    my ($i) = grep { $tl->[$_] eq $last_step } 0 .. $#$tl;
    my @after = defined $i ? @{$tl}[ $i + 1 .. $#$tl ] : ();
    cmp_ok(scalar @after, '>=', 2, 'A: two steps or more after the last '
        . 'seen (a switch may write one twice)');
    @JA_IDS = @$tl;
    sse_pump([ @live, @back ], 5, sub {
        @{ kinds($back[0], 'step') } >= @after
        && @{ kinds($back[1], 'service') } >= 2
        && grep({ $_->{id} eq $c3 } @{ kinds($live[1], 'service') })
        && @{ kinds($live[0], 'step') } >= @$tl - 1 });
    sse_pump([ @live, @back ], 0.3);
    is(join(' ', map { $_->{event} } @{ $back[0]->events }),
        join(' ', ('step') x @after), 'A: the timeline resumes with steps '
        . 'only');
    is_deeply(ids($back[0]->events), \@after,
        'A: the timeline resumes with exactly the missed steps');
    is_deeply(ids($back[1]->events), [ $c2, $c3 ],
        'A: the status resumes with exactly the missed changes');
    is_deeply(ids(kinds($live[1], 'service')), [ $c1, $c2, $c3 ],
        'A: the live status stream got every change, in order');
    is_deeply(ids(kinds($live[0], 'step')), [ @{$tl}[ 1 .. $#$tl ] ],
        'A: the live timeline stream got every step, in order')
        or diag explain { live => $live[0]->events, timeline => $tl,
            watched => $C->query_key('cg:{events:' . shard($JA) . '}:watched',
                'ZSCORE', 'cg:{events:' . shard($JA) . '}:watched', $JA),
            now => time, pid => $live[0]->header('X-Pid') };
    $_->close for @live, @back;
}

###########################################################################
# B. SIGKILL of the subscribers' node

my ($JB, $TB0, $TB1, $TB2, $MB2, $poll);
{
    # traffic between the switches
    sleep 2;
    $subs = subscribers();
    is($subs->{$MB} // 0, 2, "B: both subscribers still on $MB")
        or diag explain $subs;
    is(both_workers($W2), '200 200', 'B: a grant, cached, on both workers');
    $JB = journey_on($MB);
    step($JB, 'wait');
    my $live = sse("/status/journeys/$JB");
    my $back = sse("/status/journeys/$JB");
    sse_pump([ $live, $back ], 5, sub { @{ $live->events }
        && @{ $back->events } });
    step($JB);
    sse_pump([ $live, $back ], 5, sub { @{ kinds($back, 'step') } });
    my $last = ids(kinds($back, 'step'))->[-1];
    $back->close;

    $poll = start_client('poll', '/svc/p', [ 'X-Citizen-Id' => $W2 ], 0.01);
    sleep 0.3;
    my $mark = $t->log_mark;
    my $pid = pid_of($MB);
    ok($pid, "B: the pid of $MB");
    # the node stops answering: what it should forward to its
    # subscribers is lost with it; then it is killed (here, and
    # kill_master() reaps it and waits for its replica)
    $TB0 = time;
    kill 'STOP', $pid;
    is(req('/consents/health', citizen => $W2, method => 'DELETE',
        gw => $B)->status, 200, 'B: withdrawn through gateway b meanwhile');
    my $tw = time;
    is(req('/svc/y', citizen => $W2)->status, 200,
        'B: the invalidation was lost: the cached grant still answers');
    kill 'KILL', $pid;
    $TB1 = time;
    step($JB);
    $MB2 = $C->kill_master($MB);
    $TB2 = time;
    note(sprintf 'B: SIGKILL of %s: %s took over in %.2f s', $MB, $MB2,
        $TB2 - $TB1);

    # the subscribers moved on and flushed
    ok($t->wait_for_log(qr/consent cache flushed on \(re\)subscription/,
        since => $mark, timeout => 3), 'B: the consent cache flushed on '
        . 'resubscription');
    my $st;
    ok($t->wait_until(sub { ($st = both_workers($W2)) eq '403 403' },
        timeout => 3, interval => 0.05), 'B: the withdrawal refused on both '
        . 'workers') or diag "still $st";
    my $sum = 0;
    ok($t->wait_until(sub { $subs = subscribers(); $sum = 0;
        $sum += $_ for values %$subs; $sum == 2 }, timeout => 3),
        'B: both subscribers on a live node') or diag explain $subs;

    step($JB);
    my $refused = 0;
    my $t503 = time;
    my $r = resume("/status/journeys/$JB", $last, \$refused);
    diag(sprintf 'B: the timeline resumed %.2f s after the promotion, '
        . 'after %d answers 503 (%.2f s)', time - $TB2, $refused,
        time - $t503) if $refused;
    is($r->status, 200, 'B: the timeline resumes (200)');
    my $tl = timeline_of($JB, 4);
    my ($i) = grep { $tl->[$_] eq $last } 0 .. $#$tl;
    my @after = defined $i ? @{$tl}[ $i + 1 .. $#$tl ] : ();
    cmp_ok(scalar @after, '>=', 2, 'B: two steps or more after the last '
        . 'seen');
    sse_pump([ $live, $r ], 5, sub { @{ kinds($r, 'step') } >= @after
        && @{ kinds($live, 'step') } >= @$tl - 1 });
    sse_pump([ $live, $r ], 0.3);
    is_deeply(ids($r->events), \@after,
        'B: the timeline resumes with exactly the missed steps')
        or diag explain { status => $r->status, raw => $r->{raw},
            timeline => $tl, last => $last, live => ids($live->events) };
    is_deeply(ids(kinds($live, 'step')), [ @{$tl}[ 1 .. $#$tl ] ],
        'B: the live timeline stream got every step, in order')
        or diag explain { live => ids($live->events), timeline => $tl,
            pids => [ $live->header('X-Pid'), $r->header('X-Pid') ] };
    $_->close for $live, $r;

    my $checks = stop_client($poll);
    my @after403 = grep { $_->{t} > $tw } @$checks;
    my ($first) = grep { $_->{status} == 403 } @after403;
    my @late = grep { $first && $_->{t} > $first->{t} && $_->{status} != 403 }
        @after403;
    ok($first, 'B: the background checks turned to 403');
    is(scalar @late, 0, 'B: none answered otherwise after the first 403')
        or diag explain [ @late[ 0 .. ($#late < 4 ? $#late : 4) ] ];
    my %pids = map { $_->{pid} => 1 } grep { $first && $_->{t} >= $first->{t} }
        @after403;
    is(scalar keys %pids, 2, 'B: from both workers');
    my @cached = grep { $_->{status} == 200 && $_->{t} > $tw } @$checks;
    diag(sprintf 'B: SIGKILL of the subscribers\' node (stopped %.0f ms '
        . 'before): promotion %.2f s; the withdrawal published meanwhile '
        . 'refused %.3f s after the kill (%d checks answered from the cache '
        . 'before; cache ttl 30 s)', ($TB1 - $TB0) * 1000, $TB2 - $TB1,
        $first ? $first->{t} - $TB1 : -1, scalar @cached);
}

###########################################################################
# C. the events of the traffic

# traffic after the switches
sleep 2.5;
my $sent = stop_client($load);
my %sent = map { $_->{journey} => $_ } grep { $_->{journey} } @$sent;
is(scalar(grep { $_->{status} != 200 } @$sent), 0, scalar(@$sent)
    . ' requests of the traffic, all answered 200');
my ($slowest) = sort { $b <=> $a } map { $_->{elapsed} } @$sent;
cmp_ok($slowest, '<', 0.5, sprintf 'none waited for Redis (the longest '
    . 'response %.3f s)', $slowest);

ok($t->wait_until(sub {
    my $m = $t->metrics;
    defined $m && (metric($m, 'civicgate_event_spool_events') // 1) == 0
}, timeout => 10), 'the spool is empty');

my (%count, %eids_of, %at, %first, $entries);
$entries = 0;
for my $s (0 .. $NS - 1) {
    my $x = $C->query_key(stream($s), 'XRANGE', stream($s), '-', '+');
    for my $e (@{ ref $x eq 'ARRAY' ? $x : [] }) {
        my ($id, $fv) = @$e;
        my %f = @$fv;
        $count{ $f{eid} }++;
        $entries++;
        $eids_of{ $f{journey} }{ $f{eid} } = 1;
        $at{ $f{eid} } = $f{time} / 1000;
        my ($ms) = $id =~ /^(\d+)-/;
        push @{ $first{$s} }, [ $ms / 1000, $at{ $f{eid} } ];
    }
}
my @lost = grep { !$eids_of{$_} } keys %sent;
my @twice = grep { keys %{ $eids_of{$_} } != 1 } keys %sent;
my %known = (%sent, map { $_ => 1 } $JA, $JB);
my @unknown = grep { !$known{$_} } keys %eids_of;
is(scalar @lost, 0, scalar(keys %sent) . ' requests\' events: none lost')
    or diag "lost: @lost[0 .. ($#lost < 9 ? $#lost : 9)]";
is(scalar @twice, 0, 'one event (one eid) per request');
is(scalar @unknown, 0, 'no event of an unknown request') or diag "@unknown";
is(scalar keys %{ $eids_of{$JB} }, 4, 'the journey of B: 4 events');

# duplicates: only of events logged during a switch
# (from timeout= before a switch, for a write under way, to the slot map's
# reread, timeout= and the spool's next write after it)
sub in_switch {
    my ($a) = @_;
    return ($a > $TA0 - 1 && $a < $TA1 + 1.5)
        || ($a > $TB0 - 1 && $a < $TB2 + 1.5);
}
my @dup = grep { $count{$_} > 1 } keys %count;
my @outside = grep { !in_switch($at{$_}) } @dup;
my $calm = grep { !in_switch($at{$_}) } keys %count;
cmp_ok($calm, '>', 200, "$calm events logged outside the switches");
is(scalar @outside, 0, scalar(@dup) . ' duplicates, all of events logged '
    . 'during a switch') or diag join "\n", map { sprintf
    '%s x%d: %.3f s from A, %.3f s from B', $_, $count{$_}, $at{$_} - $TA0,
    $at{$_} - $TB0 } @outside[0 .. ($#outside < 19 ? $#outside : 19)];
{
    my %h;
    $h{ floor(($at{$_} - $TA0) * 4) / 4 }++ for @dup;
    my %n;
    $n{ $count{$_} }++ for @dup;
    my ($max) = sort { $b <=> $a } values %count;
    $max //= 0;
    cmp_ok($max, '<=', 2, "an event written $max times at most: twice at "
        . 'most, only the parts of the failed calls are written again')
        or diag join "\n", map { sprintf '%s x%d: %.3f s from A, %.3f s '
        . 'from B', $_, $count{$_}, $at{$_} - $TA0, $at{$_} - $TB0 }
        grep { $count{$_} > 2 } @dup;
    diag(sprintf 'C: %d events written twice, %d more than twice; an event '
        . 'written %d times at most', scalar(grep { $count{$_} == 2 } @dup),
        scalar(grep { $count{$_} > 2 } @dup), $max);
    note('duplicates by quarter second from A: ' . join(' ',
        map { "$_:$h{$_}" } sort { $a <=> $b } keys %h) . sprintf(
        ' (A ended at %.2f, B from %.2f to %.2f); copies: ', $TA1 - $TA0,
        $TB0 - $TA0, $TB2 - $TA0) . join ' ', map { "x$_:$n{$_}" }
        sort { $a <=> $b } keys %n);
}

# the killed master's shards: the events logged from its stop until its
# replica took over were written after that, none before
my ($stalled, $resumed, $max_wait) = (0, undef, 0);
for my $s (@{ $SHARDS_OF{$MB} }) {
    for my $e (@{ $first{$s} // [] }) {
        my ($w, $a) = @$e;
        next unless $a > $TB0;
        $stalled++ if $a < $TB2;
        $resumed = $w if $w > $TB1 && (!defined $resumed || $w < $resumed);
        $max_wait = $w - $a if $w - $a > $max_wait;
    }
}
# the switched master's shards: how long events logged during it waited
my $wait_a = 0;
for my $s (@{ $SHARDS_OF{$MA} }) {
    for my $e (@{ $first{$s} // [] }) {
        my ($w, $a) = @$e;
        $wait_a = $w - $a if $a > $TA0 - 1 && $a < $TA1 && $w - $a > $wait_a;
    }
}
diag(sprintf 'C: A: events of the switched master\'s %d shards waited '
    . '%.3f s at most', scalar @{ $SHARDS_OF{$MA} }, $wait_a);
cmp_ok($stalled, '>', 0, "B: $stalled events of its shards logged from its "
    . 'stop until its replica took over');
ok(defined $resumed, 'B: written once its replica took over');
diag(sprintf 'C: %d requests, %d events, %d distinct eids, %d duplicates; '
    . 'B: events of the killed master\'s %d shards flowing again %.2f s '
    . 'after the kill (%.2f s after the stop), the longest wait %.2f s',
    scalar @$sent, $entries, scalar keys %count,
    scalar @dup, scalar @{ $SHARDS_OF{$MB} }, ($resumed // $TB1) - $TB1,
    ($resumed // $TB0) - $TB0, $max_wait);

my $m = $t->metrics;
is(metric($m, 'civicgate_events_total', result => 'dropped') // 0, 0,
    'none dropped');
note(sprintf 'spooled %d, failed %d',
    metric($m, 'civicgate_events_total', result => 'spooled') // 0,
    metric($m, 'civicgate_events_total', result => 'failed') // 0);

cmp_ok(time - $T0, '<', 60, sprintf 'the whole test in %.1f s', time - $T0);
$t->done_testing;
