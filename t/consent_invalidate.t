#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Invalidation across gateways: two nginx instances (A and B) share one
# Redis, both cache decisions for a long time (ttl=60s, negative_ttl=30s).
# A grant or withdrawal on one gateway (API or admin) reaches the other at
# once through SUBSCRIBE (within 100 ms); each worker holds a second,
# subscriber connection.  A lost subscription (CLIENT KILL, or a Redis
# restart with its data kept) flushes the whole cache on resubscription.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $A = $t;
my $B = $t->nginx('b');
my $JSON = JSON::PP->new->utf8->canonical;

my $KEY = random_key_hex(32);
$t->write_secret_file($t->topdir . '/keys', [ [ k1 => $KEY ] ]);

my $CONF = <<'EOF';
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
        tax    "Perpajakan"        "Taxation";
    }
    civicgate_consent_cache zone=consent:1m ttl=60s negative_ttl=30s;

    server {
        listen 127.0.0.1:%%PORT_@G@%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;
        add_header X-Consent-Status $civicgate_consent_status always;
        add_header X-Gateway @G@ always;

        location /svc/ {
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/;
        }
        location /consents/ {
            civicgate_consent_api;
        }
        location /civicgate/admin/ {
            allow 127.0.0.1;
            deny all;
            civicgate_admin;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_@G@back%%;
        server_name backend;
        location /echo/ {
            return 200 "backend @G@ reached\n";
        }
    }
EOF

for my $g ([ $A, 'a' ], [ $B, 'b' ]) {
    (my $c = $CONF) =~ s/\@G\@/$g->[1]/g;
    $g->[0]->write_nginx_conf($c, worker_processes => 2);
}

$t->run_redis;
$A->run;
$B->run;

my $PA = $t->port('a');
my $PB = $t->port('b');
my $CIT = 'CIT-INV-' . unpack('H*', random_bytes(4));
my $PS = pseudonym($KEY, $CIT);
my $HKEY = "cg:{c:$PS}:consents";

sub check {
    my ($port) = @_;
    return $t->request('/svc/x', port => $port, timeout => 3,
        headers => [ 'X-Citizen-Id' => $CIT ]);
}

sub api {
    my ($method, $port) = @_;
    return $t->request('/consents/health', port => $port, method => $method,
        headers => [ 'X-Citizen-Id' => $CIT ]);
}

sub admin {
    my ($method, $port) = @_;
    return $t->request('/civicgate/admin/consents/health', port => $port,
        method => $method, headers => [ 'Content-Type' => 'application/json' ],
        body => $JSON->encode({ citizen => $CIT }));
}

# polls every ~10 ms until the status is $want; returns (seconds from
# $since to the first $want answer, number of polls) or (undef, n)
sub first_status {
    my ($port, $want, $since, $limit) = @_;
    my $n = 0;
    my $end = time + ($limit // 2);
    while (time < $end) {
        my $r = check($port);
        $n++;
        return (time - $since, $n) if $r->status == $want;
        sleep 0.01;
    }
    return (undef, $n);
}

sub record { $JSON->encode({ status => $_[0], channel => 'web',
    journey => undef, ($_[0] eq 'granted'
        ? (granted_at => '2026-01-01T00:00:00Z', expires_at => undef)
        : (withdrawn_at => '2026-01-01T00:00:00Z')),
    receipt => '0123456789abcdef' }) }

###########################################################################
# connections: per worker one command and one subscriber connection

for my $g ([ $A, 'A' ], [ $B, 'B' ]) {
    my ($gw, $name) = @$g;
    my @w = $gw->worker_pids;
    is(scalar @w, 2, "$name: two workers");
    my $ok = $t->wait_until(sub {
        my @c = $t->redis_clients;
        !grep { my $p = $_;
            my @mine = grep { ($_->{name} // '') eq "civicgate-$p" } @c;
            @mine != 2 || !grep { ($_->{sub} // 0) > 0 } @mine } @w;
    }, timeout => 5);
    ok($ok, "$name: every worker has 2 connections named civicgate-<pid>, "
        . 'one of them subscribed') or diag explain [ $t->redis_clients ];
}

###########################################################################
# B caches a denial; a grant via A's API reaches B within 100 ms

{
    my $r = check($PB);
    is($r->status, 403, 'B: no consent yet: 403 (denial cached for 30 s)');
    # the denial is cached: a grant written behind the gateways' back is
    # not seen
    $t->redis_query('HSET', $HKEY, 'health', record('granted'));
    is(check($PB)->status, 403, 'B: cached denial outlives a silent write');
    $t->redis_query('HDEL', $HKEY, 'health');

    $r = api('PUT', $PA);
    is($r->status, 201, 'A: PUT /consents/health: 201');
    my $t_done = time;
    my ($dt, $n) = first_status($PB, 200, $t_done);
    ok(defined $dt && $dt < 0.1, sprintf('B passes %s after the grant on A '
        . 'returned (%d polls; < 100 ms)',
        defined $dt ? sprintf('%.1f ms', $dt * 1000) : 'never', $n));
    $r = check($PB);
    is($r->status, 200, 'B: granted: 200');
    is($r->header('X-Consent-Status'), 'GRANTED', 'B: status GRANTED');
    is($r->body, "backend b reached\n", "B: reached B's backend");
    is(check($PA)->status, 200, 'A: granted: 200');
}

###########################################################################
# B caches the grant (ttl=60s); a withdrawal via A's API: B denies < 100 ms

{
    # the grant is cached on B: a silent withdrawal is not seen
    my $saved = $t->redis_query('HGET', $HKEY, 'health');
    $t->redis_query('HSET', $HKEY, 'health', record('withdrawn'));
    is(check($PB)->status, 200, 'B: cached grant outlives a silent withdrawal');
    is(check($PA)->status, 200, 'A: cached grant outlives a silent withdrawal');
    $t->redis_query('HSET', $HKEY, 'health', $saved);

    my $r = api('DELETE', $PA);
    is($r->status, 200, 'A: DELETE /consents/health: 200');
    my $t_done = time;
    my ($dt, $n) = first_status($PB, 403, $t_done);
    ok(defined $dt && $dt < 0.1, sprintf('B denies %s after the withdrawal on '
        . 'A returned (%d polls; < 100 ms)',
        defined $dt ? sprintf('%.1f ms', $dt * 1000) : 'never', $n));
    $r = check($PB);
    is($r->status, 403, 'B: withdrawn: 403');
    is($r->header('X-Consent-Status'), 'DENIED', 'B: status DENIED');
    is(check($PA)->status, 403, 'A: withdrawn: 403 (denial now cached on A)');
}

###########################################################################
# A caches the denial; a grant at B's counter (admin, raw id) reaches A

{
    # (a subscriber that reconnects, on a machine too loaded to answer its
    # PING in time, flushes the cache, and the withdrawal's invalidation
    # may reach A only after its denial was cached: then it is cached again)
    my $status;
    for (1 .. 3) {
        check($PA);
        $t->redis_query('HSET', $HKEY, 'health', record('granted'));
        $status = check($PA)->status;
        $t->redis_query('HSET', $HKEY, 'health', record('withdrawn'));
        last if $status == 403;
        sleep 0.2;
    }
    is($status, 403, 'A: cached denial outlives a silent grant');

    my $r = admin('PUT', $PB);
    is($r->status, 201, 'B: admin PUT (raw citizen id): 201') or diag $r->raw;
    my $rc = eval { $JSON->decode($r->body) };
    is($rc && $rc->{channel}, 'counter', 'admin receipt: channel counter');
    is($rc && $rc->{citizen}, $PS, 'admin receipt: the same pseudonym');
    my $t_done = time;
    $r = check($PA);
    my $first = $r->status;
    my ($dt, $n) = $first == 200 ? (time - $t_done, 1)
        : first_status($PA, 200, $t_done);
    is($first, 200, 'A passes at once (the first request after the admin '
        . 'grant on B)');
    ok(defined $dt && $dt < 0.1, sprintf('A passes %s after the admin grant '
        . '(< 100 ms)', defined $dt ? sprintf('%.1f ms', $dt * 1000) : 'never'));
    is(check($PB)->status, 200, 'B: passes too');

    # and the admin withdrawal on A reaches B
    $r = admin('DELETE', $PA);
    is($r->status, 200, 'A: admin DELETE: 200');
    $t_done = time;
    ($dt, $n) = first_status($PB, 403, $t_done);
    ok(defined $dt && $dt < 0.1, sprintf('B denies %s after the admin '
        . 'withdrawal on A', defined $dt ? sprintf('%.1f ms', $dt * 1000)
        : 'never'));
}

###########################################################################
# subscription lost (CLIENT KILL) and restored: the cache is flushed

sub b_subscribers {
    my %w = map { ("civicgate-$_" => 1) } $B->worker_pids;
    return grep { $w{ $_->{name} // '' } && ($_->{sub} // 0) > 0 }
        $t->redis_clients;
}

{
    my $r = api('PUT', $PA);
    is($r->status, 201, 'A: grant again');
    $t->wait_until(sub { check($PB)->status == 200 }, timeout => 1,
        interval => 0.01);
    sleep 0.1;    # every worker has the grant's message behind it
    is(check($PB)->status, 200, 'B: granted and cached');
    is(check($PB)->status, 200, 'B: granted and cached (again)');
    is(check($PA)->status, 200, 'A: granted and cached');

    # withdrawn behind B's back: only a cache flush makes B see it
    $t->redis_query('HSET', $HKEY, 'health', record('withdrawn'));
    is(check($PB)->status, 200, 'B: the cached grant still answers');

    my @subs = b_subscribers();
    is(scalar @subs, 2, "B: two subscriber connections");
    my $mark = $B->log_mark;
    my $amark = $A->log_mark;
    for my $c (@subs) {
        is($t->redis_query('CLIENT', 'KILL', 'ID', $c->{id}), 1,
            "CLIENT KILL ID $c->{id} ($c->{name})");
    }
    my $ok = $t->wait_until(sub {
        my @l = $B->log_since($mark)
            =~ /civicgate: consent cache flushed on \(re\)subscription/g;
        @l >= 2 }, timeout => 5);
    ok($ok, 'B: info log "civicgate: consent cache flushed on '
        . '(re)subscription" for each worker after reconnecting')
        or diag $B->log_since($mark);
    like($B->log_since($mark),
        qr/\[info\].*civicgate: consent cache flushed on \(re\)subscription/,
        'the flush line is at [info]');
    my %old = map { $_->{id} => 1 } @subs;
    my @new = b_subscribers();
    is(scalar(grep { !$old{ $_->{id} } } @new), 2,
        'B: two new subscriber connections');
    $r = check($PB);
    is($r->status, 403, 'B: after the resubscription the check goes to Redis '
        . 'and sees the withdrawal');
    is($r->header('X-Consent-Status'), 'DENIED', 'B: DENIED');
    unlike($A->log_since($amark), qr/consent cache flushed/,
        "A kept its subscription: A's cache not flushed");
    is(check($PA)->status, 200, 'A: its own cached grant still answers '
        . '(A never lost its subscription)');
}

###########################################################################
# Redis restarted with its data kept: cached grants answer while it is
# down; on resubscription the cache is flushed

{
    my $r = api('PUT', $PA);
    is($r->status, 201, 'A: grant again');
    $t->wait_until(sub { check($PB)->status == 200 }, timeout => 1,
        interval => 0.01);
    sleep 0.1;
    is(check($PB)->status, 200, 'B: granted and cached');
    $t->redis_query('HSET', $HKEY, 'health', record('withdrawn'));
    is(check($PB)->status, 200, 'B: cached grant, withdrawal written silently');
    is($t->redis_query('SAVE'), 'OK', 'Redis SAVE');

    my $mark = $B->log_mark;
    my $amark = $A->log_mark;
    $t->stop_redis;
    is(check($PB)->status, 200, 'B: Redis down: the cached grant answers');
    $t->run_redis;
    is($t->redis_query('HGET', $HKEY, 'health'), record('withdrawn'),
        'Redis restarted with the data kept');

    my $ok = $t->wait_until(sub {
        my @l = $B->log_since($mark)
            =~ /civicgate: consent cache flushed on \(re\)subscription/g;
        @l >= 2 }, timeout => 8);
    ok($ok, 'B: cache flushed on resubscription (each worker)')
        or diag $B->log_since($mark);
    ok($t->wait_until(sub {
        my @l = $A->log_since($amark)
            =~ /civicgate: consent cache flushed on \(re\)subscription/g;
        @l >= 2 }, timeout => 8), 'A: cache flushed on resubscription too');
    # the command connections come back on their own, jittered, schedule:
    # until then a check answers 503 (unavailable), never 200
    my %seen;
    for my $g ([B => $PB], [A => $PA]) {
        $t->wait_until(sub {
            my $s = check($g->[1])->status;
            $seen{$g->[0]}{$s}++;
            $s != 503 }, timeout => 8, interval => 0.05);
    }
    ok(!$seen{B}{200} && !$seen{A}{200},
        'no check passed while the gateways reconnected');
    $r = check($PB);
    is($r->status, 403, 'B: after the restart the check sees the withdrawal');
    is(check($PA)->status, 403, 'A: after the restart the check sees it too');

    # and invalidation works on the new subscriptions
    $r = api('PUT', $PA);
    is($r->status, 201, 'A: grant after the restart');
    my $t_done = time;
    my ($dt, $n) = first_status($PB, 200, $t_done);
    ok(defined $dt && $dt < 0.1, sprintf('B passes %s after the grant '
        . '(new subscription)', defined $dt ? sprintf('%.1f ms', $dt * 1000)
        : 'never'));
}

$t->done_testing;
