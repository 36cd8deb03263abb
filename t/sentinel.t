#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# civicgate_redis mode=sentinel against a real Sentinel set (a master, a
# replica, three Sentinels, all on loopback): "nginx -t" refuses the
# wrong forms; the gateway finds the master through the Sentinels; under
# a load of journey events, a SENTINEL FAILOVER loses no event (distinct
# eids on the new master = requests answered) and a SIGKILL of the master
# none but those it acknowledged in the second before its end and had not
# yet replicated (counted and printed), the time from the failover's start to the first write on the
# new master is printed; a store=redis limit keeps counting on the new
# master and answers at once meanwhile; a consent withdrawn after the
# failover is enforced; status Server-Sent Events keep flowing and resume
# with Last-Event-ID.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);
use Civicgate::Sentinel;

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file($t->topdir . '/keys', [ [ k1 => $KEY ] ]);
$t->write_file($t->topdir . '/pw', "secret\n");

my $SEN = join ' ', map { "redis://127.0.0.1:%%PORT_sentinel$_%%" } 1 .. 3;

###########################################################################
# A. nginx -t

my $SERVER = <<'EOF';
    server {
        listen 127.0.0.1:%%PORT_0%%;
        location / { civicgate_journey on; return 200 "ok\n"; }
    }
EOF

my @fail = (
    [ 'mode=sentinel without master=', "$SEN mode=sentinel",
      qr/requires "master="/ ],
    [ 'master= without mode=sentinel', "$SEN master=cg",
      qr/several URLs|"master=" without/ ],
    [ 'master= with one URL and no mode', 'redis://127.0.0.1:1 master=cg',
      qr/"master=" without "mode=sentinel"/ ],
    [ 'several URLs in single mode', "$SEN mode=single",
      qr/several URLs only with "mode=sentinel"/ ],
    [ 'mixed schemes', 'redis://127.0.0.1:1 rediss://127.0.0.1:2'
      . ' mode=sentinel master=cg tls_verify=off',
      qr/mixes redis:\/\/ and rediss:\/\// ],
    [ 'mode=cluster with a database', 'redis://127.0.0.1:1/2 mode=cluster',
      qr/with "mode=cluster" takes database 0 only/ ],
    [ 'mode=cluster with master=', 'redis://127.0.0.1:1 mode=cluster'
      . ' master=cg', qr/"master=" without "mode=sentinel"/ ],
    [ 'mode=cluster with mixed schemes', 'redis://127.0.0.1:1'
      . ' rediss://127.0.0.1:2 mode=cluster tls_verify=off',
      qr/mixes redis:\/\/ and rediss:\/\// ],
    [ 'an unknown mode', 'redis://127.0.0.1:1 mode=ring',
      qr/invalid parameter "mode=ring"/ ],
    [ 'a user in a Sentinel URL', 'redis://gw@127.0.0.1:1 mode=sentinel'
      . ' master=cg', qr/sentinel_user=/ ],
    [ 'sentinel_user= without mode=sentinel',
      'redis://127.0.0.1:1 sentinel_user=s', qr/sentinel_ parameters/ ],
    [ 'an empty master=', "$SEN mode=sentinel master=",
      qr/invalid parameter "master="/ ],
);

my $n = 0;
for my $c (@fail) {
    my ($name, $args, $like) = @$c;
    $t->nginx('case' . ++$n)->config_fails($name,
        "civicgate_secret_file %%TOPDIR%%/keys;\n"
        . "civicgate_redis $args;\n" . $SERVER,
        like => $like, line => qr/civicgate_redis/);
}

$t->nginx('case' . ++$n)->config_ok(
    'nginx -t accepts mode=sentinel with users and passwords',
    "civicgate_secret_file %%TOPDIR%%/keys;\n"
    . "civicgate_redis $SEN mode=sentinel master=cg user=gw"
    . ' password_file=%%TOPDIR%%/pw sentinel_user=watcher'
    . " sentinel_password_file=%%TOPDIR%%/pw;\n" . $SERVER);

###########################################################################
# the Sentinel set and the gateway

my $S = Civicgate::Sentinel->start($t, name => 'cg');
my ($PA, $PB) = ($t->port('sentinel_a'), $t->port('sentinel_b'));
is($S->master_port, $PA, 'the Sentinels name the first server master');

my $API = api_locations(qw(consents status admin metrics));
$t->write_nginx_conf(<<"EOF", worker_processes => 2);
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis $SEN mode=sentinel master=cg
                    timeout=300ms connect_timeout=300ms;
    civicgate_channels web;
    civicgate_limit_zone \$http_x_key zone=sl:1m rate=1r/m store=redis
                         on_error=local;

    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
    }
    civicgate_consent_cache zone=consent:1m ttl=60s negative_ttl=30s;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on;
        civicgate_citizen \$http_x_citizen_id;
        add_header X-Limit-Status \$civicgate_limit_status always;
        add_header X-Consent-Status \$civicgate_consent_status always;

        location /ev {
            civicgate_service ev;
            return 200 "ok\\n";
        }
        location /lim {
            civicgate_service lim;
            civicgate_limit zone=sl burst=4 nodelay;
            proxy_pass http://127.0.0.1:%%PORT_back%%/echo/;
        }
        location /svc/ {
            civicgate_service svc;
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_back%%/echo/;
        }
$API
    }

    server {
        listen 127.0.0.1:%%PORT_back%%;
        server_name backend;
        civicgate_events off;
        location /echo/ {
            return 200 "backend reached\\n";
        }
    }
EOF
$t->run;

# every worker's command, subscriber and Sentinel connections
sub connected {
    my ($port) = @_;
    my @w = $t->worker_pids;
    my @c = eval { $t->redis_clients({ port => $port }) };
    my @s = map { eval { $t->redis_clients({ port => $_ }) } }
        $S->sentinel_ports;
    for my $p (@w) {
        return 0 unless 2 == grep { ($_->{name} // '') eq "civicgate-$p" } @c;
        return 0 unless grep { ($_->{name} // '') eq "civicgate-$p" } @s;
    }
    return 1;
}

ok($t->wait_until(sub { connected($PA) }, timeout => 5),
    'B. each worker: command and subscriber connections to the master,'
    . ' one to a Sentinel');
{
    my $r = $t->request('/ev');
    is($r->status, 200, 'a request');
    ok($t->wait_until(sub { ($t->redis_query('XLEN', 'cg:events') // 0)
        >= 1 }), 'its event is written on the master');
    my $m = $t->metrics;
    is(metric($m, 'civicgate_redis_connections', role => 'sentinel'), 8,
        'civicgate_redis_connections{role="sentinel"} = 8: per worker, one'
        . ' asks, one listens to each Sentinel');
    is(metric($m, 'civicgate_redis_failovers_total'), 0,
        'civicgate_redis_failovers_total = 0');
}

# the events of a load of /ev requests: distinct eids on the master, and
# the time from $t0 to the first event after the longest gap of writes
#
# A master killed outright loses what it acknowledged but had not yet sent
# to its replica (Redis replicates asynchronously: docs/redis-modes.md):
# with $window, events answered within that many seconds before $t0 may be
# lost, and are counted; none answered earlier or later may be.
sub check_events {
    my ($res, $t0, $what, $window) = @_;
    my %sent = map { $_->{journey} => 1 }
        grep { $_->{status} == 200 } @{ $res->{results} };
    my (%eids, %journeys, @ms, $all);
    my $done = $t->wait_until(sub {
        %eids = %journeys = ();
        @ms = ();
        $all = 0;
        for my $e (@{ $t->redis_stream('cg:events') }) {
            $all++;
            next unless ($e->{f}{service} // '') eq 'ev';
            next unless $sent{ $e->{f}{journey} // '' };
            $eids{ $e->{f}{eid} }++;
            $journeys{ $e->{f}{journey} }++;
            push @ms, ($e->{id} =~ /^(\d+)/)[0];
        }
        scalar(keys %journeys) >= scalar(keys %sent);
    }, timeout => 10, interval => 0.25);
    my $lost = grep { !$journeys{$_} } keys %sent;
    if (defined $window) {
        my %answered = map { $_->{journey} => $_->{start} + $_->{elapsed} }
            grep { $_->{status} == 200 } @{ $res->{results} };
        my @unreplicated = grep { !$journeys{$_}
            && $answered{$_} <= $t0 && $answered{$_} > $t0 - $window }
            keys %sent;
        diag("$what: " . scalar(@unreplicated) . ' events acknowledged by the'
            . " killed master in the $window s before its end, not replicated");
        $lost -= @unreplicated;
    }

    my $dups = @ms - scalar(keys %journeys);
    my $dup_eids = grep { $_ > 1 } values %eids;
    is($lost, 0, "$what: no event lost ("
        . scalar(keys %sent) . ' requests answered)');
    is(scalar(keys %eids), scalar(keys %journeys), "$what: one eid per "
        . "journey ($dups events written twice, $dup_eids eids twice)");
    my ($gap, $end) = (0, undef);
    @ms = sort { $a <=> $b } @ms;
    for my $i (1 .. $#ms) {
        next if $ms[$i] < $t0 * 1000;
        if ($ms[$i] - $ms[$i - 1] > $gap) {
            $gap = $ms[$i] - $ms[$i - 1];
            $end = $ms[$i];
        }
    }
    my $first = defined $end ? $end / 1000 - $t0 : undef;
    diag(sprintf('%s: first write on the new master %.3f s after the start;'
        . ' longest gap between writes %d ms; %d requests answered, %d'
        . ' of its events (%d in the stream), max response time %.3f s',
        $what, $first // -1, $gap, $res->{answered}, scalar(@ms), $all,
        $res->{max_elapsed}));
    return $first;
}

sub limit_round {
    my ($key) = @_;
    return join ' ', map {
        my $r = $t->request('/lim', headers => [ 'X-Key' => $key ]);
        $r->status . ':' . ($r->header('X-Limit-Status') // '-');
    } 1 .. 6;
}

###########################################################################
# C. SENTINEL FAILOVER under load

{
    is(limit_round('before'), join(' ', ('200:PASSED') x 5) . ' 429:REJECTED',
        'limit: 5 of 6 pass on the first master');

    my $mark = $t->log_mark;
    my $job = $t->start_load(clients => 3, requests => 120, interval => 0.01,
        path => '/ev', timeout => 5);
    my $lim = $t->start_load(clients => 1, requests => 60, interval => 0.02,
        path => '/lim', headers => sub { [ 'X-Key' => "during-$_[1]" ] },
        timeout => 5);
    sleep 0.5;
    my $t0 = time;
    # led by a Sentinel other than the one the workers ask: its early
    # announcement reaches them through their listening connections
    my $took = $S->failover(via => 1);
    diag(sprintf('SENTINEL FAILOVER: the Sentinels named the new master'
        . ' after %.3f s', $took));
    is($S->master_port, $PB, 'the replica is the new master');
    my $res = $t->wait_load($job, timeout => 30);
    my $lres = $t->wait_load($lim, timeout => 30);

    is($res->{answered}, 360, 'C. all 360 requests answered 200')
        or diag explain $res->{statuses};
    cmp_ok($res->{max_elapsed}, '<', 1, 'none waited for the failover');
    my $first = check_events($res, $t0, 'SENTINEL FAILOVER');
    ok(defined $first && $first < 5, 'events written on the new master'
        . ' within 5 s of the failover');

    is($lres->{answered}, 60, 'limit during the failover: 60 answered 200')
        or diag explain $lres->{statuses};
    cmp_ok($lres->{max_elapsed}, '<', 1, 'limit: none waited more than 1 s');
    my $fb = metric($t->metrics, 'civicgate_limit_fallbacks_total') // 0;
    cmp_ok($fb, '>', 0, "limit: on_error=local decided meanwhile ($fb"
        . ' decisions)');

    ok($t->wait_until(sub { connected($PB) }, timeout => 5),
        'the workers are connected to the new master');
    my $keys = () = $t->redis_scan_keys('cg:{l:*}:sl');
    is(limit_round('after'), join(' ', ('200:PASSED') x 5) . ' 429:REJECTED',
        'limit: 5 of 6 pass on the new master');
    is(scalar(() = $t->redis_scan_keys('cg:{l:*}:sl')), $keys + 1,
        'its key is on the new master');

    my $log = $t->log_since($mark);
    my $switch = qr/\[warn\].*redis master "cg" switched from 127\.0\.0\.1:/
        . $PA . qr/ to 127\.0\.0\.1:$PB/;
    $switch = qr/$switch/;
    like($log, $switch, 'one [warn] line with both addresses');
    my @lines = $log =~ /\[warn\][^\n]*switched from/g;
    is(scalar @lines, 1, 'logged once');
    is(metric($t->metrics, 'civicgate_redis_failovers_total'), 1,
        'civicgate_redis_failovers_total = 1');
}

###########################################################################
# D. consent and status streams after the failover

{
    my $CIT = 'CIT-SEN-' . unpack('H*', random_bytes(4));
    my $check = sub {
        $t->request('/svc/x', timeout => 3,
            headers => [ 'X-Citizen-Id' => $CIT ])->status;
    };
    my $r = $t->request('/consents/health', method => 'PUT',
        headers => [ 'X-Citizen-Id' => $CIT ]);
    ok($r->status == 200 || $r->status == 201, 'consent granted after the'
        . ' failover') or diag $r->raw;
    # cached by both workers
    is(join(' ', map { $check->() } 1 .. 6), join(' ', (200) x 6),
        'granted: 200');
    $r = $t->request('/consents/health', method => 'DELETE',
        headers => [ 'X-Citizen-Id' => $CIT ]);
    ok($r->status == 200 || $r->status == 204, 'consent withdrawn')
        or diag $r->raw;
    my $t0 = time;
    my $ok = $t->wait_until(sub {
        !grep { $_ != 403 } map { $check->() } 1 .. 6 }, timeout => 2,
        interval => 0.01);
    ok($ok, sprintf('the withdrawal is enforced by every worker (%.3f s)',
        time - $t0));

    my $s = $t->sse_open('/status/');
    $s->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
    my $a = json_of(admin_service($t, PUT => 'ev', { state => 'degraded' }));
    ok($s->wait_for(sub { grep { ($_->{id} // '') eq ($a->{id} // '?') }
        @{ $_[0]->events } }, 3), 'status: a change reaches the stream');
    $s->close;
    my @missed = map {
        (json_of(admin_service($t, PUT => 'ev', { state => $_ })) // {})->{id}
    } qw(outage operational);
    my $x = $t->sse_open('/status/',
        headers => [ 'Last-Event-ID' => $a->{id} ]);
    $x->wait_for(sub { @{ $_[0]->events } >= 2 }, 3);
    is_deeply([ map { $_->{id} } @{ $x->events } ], \@missed,
        'status: Last-Event-ID resumes with the missed changes');
    $x->close;
}

###########################################################################
# E. SIGKILL of the master under load

{
    # the old master becomes a replica of the new one first
    ok($t->wait_until(sub {
        my $i = $S->query($PA, 'INFO', 'replication') // '';
        !ref $i && $i =~ /role:slave/ && $i =~ /master_link_status:up/;
    }, timeout => 20, interval => 0.2), 'the old master is now a replica');
    ok($t->wait_until(sub {
        my $r = $S->query(($S->sentinel_ports)[0], 'SENTINEL', 'replicas',
            'cg');
        ref $r eq 'ARRAY' && @$r == 1 && join(' ', @{ $r->[0] })
            =~ /flags slave(?:\s|$)/;
    }, timeout => 20, interval => 0.2), 'the Sentinels see it as a replica');

    my $s = $t->sse_open('/status/');
    $s->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);

    my $mark = $t->log_mark;
    my $job = $t->start_load(clients => 3, requests => 250, interval => 0.01,
        path => '/ev', timeout => 5);
    sleep 0.5;
    my $t0 = time;
    my $took = $S->kill_master;
    diag(sprintf('SIGKILL: the Sentinels named the new master after %.3f s',
        $took));
    is($S->master_port, $PA, 'the first server is master again');
    my $res = $t->wait_load($job, timeout => 40);

    is($res->{answered}, 750, 'E. all 750 requests answered 200')
        or diag explain $res->{statuses};
    cmp_ok($res->{max_elapsed}, '<', 1, 'none waited for the failover');
    my $first = check_events($res, $t0, 'SIGKILL', 1);
    ok(defined $first && $first < 10, 'events written on the new master'
        . ' within 10 s of the kill');

    my $a = json_of(admin_service($t, PUT => 'ev', { state => 'degraded' }));
    ok($s->wait_for(sub { grep { ($_->{id} // '') eq ($a->{id} // '?') }
        @{ $_[0]->events } }, 3), 'status: the open stream still receives'
        . ' changes');
    $s->close;
    is(metric($t->metrics, 'civicgate_redis_failovers_total'), 2,
        'civicgate_redis_failovers_total = 2');
}

$t->done_testing;
