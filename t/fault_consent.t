#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Consent against each fault between nginx and Redis
# (Civicgate::FaultProxy): a decision in the cache still answers (a grant
# 200, a refusal 403); an uncached check fails closed (503 problem+json
# consent-unavailable, status ERROR) or, with on_error=allow, goes on with
# status ERROR; the consent API answers 503 problem+json.  Every answer
# comes within timeout= plus connect_timeout= plus a margin.  Once the
# fault clears, checks and the API work again, and a withdrawal made
# meanwhile through another gateway (reaching Redis directly) takes effect
# at once, not after the cache ttl=.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::FaultProxy qw(@FAULTS timed_request);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new;
my $BOUND = 0.2 + 0.2 + 1.0;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

# gateway b reaches Redis directly, not through the proxy
my $B = $t->nginx('b');
my $CONF = <<'EOF';
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%PORT_@REDIS@%% timeout=200ms connect_timeout=200ms;

    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
    }
    civicgate_consent_cache zone=consent:1m ttl=30s negative_ttl=30s;

    server {
        listen 127.0.0.1:%%PORT_@LISTEN@%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;
        add_header X-Consent-Status $civicgate_consent_status always;

        location /svc/ {
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_@LISTEN@back%%/echo/;
        }
        location /allow/ {
            civicgate_consent health on_error=allow;
            proxy_pass http://127.0.0.1:%%PORT_@LISTEN@back%%/echo/;
        }
        location /consents/ {
            civicgate_consent_api;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_@LISTEN@back%%;
        server_name backend;
        location /echo/ {
            return 200 "backend reached\n";
        }
    }
EOF
for my $g ([ $t, 'redis', '0' ], [ $B, 'real', 'b' ]) {
    (my $c = $CONF) =~ s/\@REDIS\@/$g->[1]/;
    $c =~ s/\@LISTEN\@/$g->[2]/g;
    $g->[0]->write_nginx_conf($c);
}

$t->run_redis(port => 'real');
my $p = Civicgate::FaultProxy->start($t, listen => $t->port('redis'),
    to => $t->redis_port);
$t->run;
$B->run;

my $n = 0;
sub citizen { sprintf 'CIT-FAULT-%d-%d', $$, ++$n }

sub api {
    my ($method, $path, $cit) = @_;
    return timed_request($t, $path, method => $method,
        headers => [ 'X-Citizen-Id' => $cit ]);
}

sub check {
    my ($path, $cit) = @_;
    return timed_request($t, $path, headers => [ 'X-Citizen-Id' => $cit ]);
}

sub problem { my $d = eval { $JSON->decode($_[0]->body // '') }; $d // {} }

# a fresh decision in the cache for each citizen; a flush by a
# resubscription (after the previous fault) would empty it: then again
sub cache {
    my @cits = @_;
    # both connections set up: the subscriber's flush comes with its
    # subscription, not later
    $t->wait_until(sub {
        my $m = $t->metrics;
        (metric($m, 'civicgate_redis_connections', role => 'subscriber')
            // 0) >= 1
        && (metric($m, 'civicgate_redis_connections', role => 'command')
            // 0) >= 1 }, timeout => 5);
    # a subscriber that was slowed by the previous fault may notice it only
    # at its next silence check (a second plus timeout=), and resubscribe
    for (1 .. 10) {
        my $mark = $t->log_mark;
        my @st = map { (check('/svc/x', $_))[0]->status } @cits;
        sleep 1.5;
        return "@st" unless $t->log_since($mark)
            =~ /consent cache flushed on \(re\)subscription/;
    }
    return 'flushed every time';
}

my ($GRANTED, $REFUSED) = (citizen(), citizen());
is((api('PUT', '/consents/health', $GRANTED))[0]->status, 201,
    'a citizen grants health');
# the subscription is up: the grant's invalidation came back
ok($t->wait_for_log(qr/consent cache flushed on \(re\)subscription/,
    timeout => 5), 'the consent cache is subscribed');

for my $f (@FAULTS) {
    my ($label, @mode) = @$f;
    my $fresh = citizen();
    is((api('PUT', '/consents/health', $fresh))[0]->status, 201,
        "$label: a second citizen grants health (not cached)");
    my $withdrawn = citizen();
    is((api('PUT', '/consents/health', $withdrawn))[0]->status, 201,
        "$label: a third citizen grants health");
    is(cache($GRANTED, $REFUSED, $withdrawn), '200 403 200',
        "$label: two grants and a refusal in the cache");

    my $mark = $t->log_mark;
    $p->mode(@mode);
    my $t_fault = time;
    my (@late, $max);
    $max = 0;
    my $timed = sub {
        my ($what, $r, $el) = @_;
        $max = $el if $el > $max;
        push @late, sprintf('%s: %.3f s', $what, $el) if $el > $BOUND;
        return $r;
    };

    # first, while the connection still looks fine: a grant through the
    # API, sent to a Redis that may execute it without the answer coming
    my $first_cit = citizen();
    my $r = $timed->('API PUT first', api('PUT', '/consents/health',
        $first_cit));
    is($r->status, 503, "$label: API PUT first thing: 503");
    my $first_detail = problem($r)->{detail} // '';
    like($first_detail, qr/nothing was changed|may not have been stored/,
        "$label:   says whether the change may have been stored");

    $r = $timed->('cached grant', check('/svc/a', $GRANTED));
    is($r->status, 200, "$label: a cached grant passes")
        or diag grep { /civicgate/ } split /^/, $t->log_since($mark);
    is($r->header('X-Consent-Status'), 'GRANTED', "$label:   GRANTED");
    $r = $timed->('cached refusal', check('/svc/a', $REFUSED));
    is($r->status, 403, "$label: a cached refusal still refuses");

    for my $c ([ 'granted, uncached', $fresh ], [ 'never asked', citizen() ]) {
        $r = $timed->("uncached $c->[0]", check('/svc/b', $c->[1]));
        is($r->status, 503, "$label: $c->[0]: 503") or diag $r->raw;
        like($r->header('Content-Type') // '',
            qr{^application/problem\+json\b}, "$label:   problem+json");
        is(problem($r)->{type}, 'urn:civicgate:problem:consent-unavailable',
            "$label:   consent-unavailable");
        is($r->header('X-Consent-Status'), 'ERROR', "$label:   ERROR");
        unlike($r->body // '', qr/backend reached/,
            "$label:   the backend is not reached");
    }

    $r = $timed->('on_error=allow', check('/allow/c', citizen()));
    is($r->status, 200, "$label: on_error=allow: 200");
    is($r->header('X-Consent-Status'), 'ERROR', "$label:   ERROR");

    my ($api_cit, $unchanged) = (citizen());
    for my $m ([ PUT => '/consents/health' ], [ GET => '/consents/' ]) {
        $r = $timed->("API @$m", api(@$m, $api_cit));
        is($r->status, 503, "$label: API @$m: 503");
        is(problem($r)->{type}, 'urn:civicgate:problem:consent-unavailable',
            "$label:   consent-unavailable");
        my $detail = problem($r)->{detail} // '';
        like($detail, qr/nothing was changed|may not have been stored/,
            "$label:   says whether the change may have been stored");
        $unchanged = $detail =~ /nothing was changed/ if $m->[0] eq 'PUT';
    }

    # a withdrawal through gateway b, which reaches Redis
    my $w = $B->request('/consents/health', method => 'DELETE',
        port => $t->port('b'), timeout => 5,
        headers => [ 'X-Citizen-Id' => $withdrawn ]);
    is($w->status, 200, "$label: the third citizen withdraws through "
        . 'gateway b');

    # past the subscriber's silence check (a second plus timeout=), while
    # the worker reconnects
    my $left = $t_fault + 1.6 - time;
    sleep $left if $left > 0;
    for my $i (1 .. 3) {
        $r = $timed->("later $i", check('/svc/f', $fresh));
        is($r->status, 503, "$label: 1.6 s on, uncached, check $i: 503");
        $r = $timed->("later cached $i", check('/svc/f', $GRANTED));
        is($r->status, 200, "$label: 1.6 s on, the cached grant, check $i: 200");
        sleep 0.2;
    }
    is_deeply(\@late, [], sprintf('%s: every answer within %.1f s '
        . '(max %.3f s)', $label, $BOUND, $max));

    $p->mode('pass');
    my $t0 = time;
    ok($t->wait_until(sub {
        (check('/svc/d', $fresh))[0]->status == 200 }, timeout => 8,
        interval => 0.1), "$label cleared: the uncached grant passes");
    diag(sprintf '%s cleared: consent checked again after %.2f s', $label,
        time - $t0);
    # the withdrawal outlives the fault by a reconnection (backoff up to
    # 2 s) and a resubscription at most, never by the cache ttl= (30 s)
    my $st;
    ok($t->wait_until(sub {
        $st = (check('/svc/w', $withdrawn))[0]->status; $st == 403 },
        timeout => 2 + 1.2 + 1.0, interval => 0.1), sprintf('%s cleared: '
        . 'the withdrawal made meanwhile takes effect (%.2f s)', $label,
        time - $t0)) or diag "still $st";
    if ($first_detail =~ /nothing was changed/) {
        is((check('/svc/u', $first_cit))[0]->status, 403, "$label cleared: "
            . 'the first grant answered "nothing was changed" was not stored');
    } else {
        pass("$label cleared: the first grant may have been stored");
    }
    if ($unchanged) {
        # "nothing was changed" must hold
        is((check('/svc/u', $api_cit))[0]->status, 403, "$label cleared: "
            . 'the grant answered "nothing was changed" was not stored');
    } else {
        pass("$label cleared: the grant may have been stored");
    }
    my $late = citizen();
    is((api('PUT', '/consents/health', $late))[0]->status, 201,
        "$label cleared: the API grants again");
    is((check('/svc/e', $late))[0]->status, 200,
        "$label cleared: and the grant is seen");
}

$p->stop;
$t->done_testing;
