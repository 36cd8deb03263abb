#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Journey timelines on the status endpoint: one journey across the web,
# the app and the counter, its timeline (steps in request order with
# channel, service and outcome class; the channels touched; nothing about
# the citizen, the method, the status code or the latency); a forged, a
# malformed and an unknown ID all get the same 404; Server-Sent Events on
# a journey (snapshot, then each new step; Last-Event-ID resumes) and
# long-poll (answers on a new step); a step whose publication comes after
# another stream on the worker read it still reaches the streams that were
# following, once each, in order.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Time::Local qw(timegm);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);

my $t = Civicgate::Test->new;
my $JRE = journey_id_re();

my $KEY = random_key_hex(32);
my $OTHER = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_channel $http_x_channel;
        civicgate_citizen $http_x_citizen_id;

        location /tax/ {
            civicgate_journey on;
            civicgate_service tax;
            return 200 "tax\n";
        }
        location /health/ {
            civicgate_journey on;
            civicgate_service health-records;
            return 404;
        }
        location /permits/ {
            civicgate_journey on;
            civicgate_service permits;
            return 503;
        }
        location /forms/ {
            civicgate_journey on;
            civicgate_service permits;
            proxy_pass http://127.0.0.1:%%PORT_1%%/backend;
        }
        location /status/ {
            civicgate_status;
            civicgate_status_heartbeat 1s;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name backend;
        location / {
            return 201 "created\n";
        }
    }
EOF

$t->run_redis;
$t->run;

my $CITIZEN = 'CZ-' . unpack('H*', random_bytes(6));
my $PSEUDO = pseudonym($KEY, $CITIZEN);
my $TS_MS_RE = qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

sub ms_of {
    my ($s) = @_;
    return undef unless defined $s && $s =~
        /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{3})Z$/;
    return timegm($6, $5, $4, $3, $2 - 1, $1) * 1000 + $7;
}

my $J;

sub step {
    my ($method, $path, $channel) = @_;
    my $r = $t->request($path, method => $method, headers => [
        'X-Channel' => $channel, 'X-Citizen-Id' => $CITIZEN,
        (defined $J ? ('X-Journey-ID' => $J) : ()) ],
        ($method eq 'POST' ? (body => 'a=1') : ()));
    $J //= $r->header('X-Journey-ID');
    return $r;
}

sub events { $t->journey_timeline($J) }

sub wait_events {
    my ($n) = @_;
    return $t->wait_until(sub { $t->journey_length($J) >= $n },
        timeout => 5);
}

sub timeline {
    my ($id, @h) = @_;
    return $t->request('/status/journeys/' . ($id // $J), headers => \@h);
}

sub all_keys {
    my ($v) = @_;
    return map { ($_, all_keys($v->{$_})) } keys %$v if ref $v eq 'HASH';
    return map { all_keys($_) } @$v if ref $v eq 'ARRAY';
    return ();
}

sub step_of {
    my ($e) = @_;
    my $st = $e->{f}{status};
    return { id => $e->{id}, channel => $e->{f}{channel},
        service => $e->{f}{service}, outcome => substr($st, 0, 1) . 'xx',
        time_ms => $e->{f}{time} };
}

sub as_expected {
    my ($s) = @_;
    return { id => $s->{id}, channel => $s->{channel},
        service => $s->{service}, outcome => $s->{outcome},
        time_ms => ms_of($s->{time}) };
}

###########################################################################
# one journey, three channels

my @PLAN = (
    [ GET => '/tax/a', web => 'tax', '2xx' ],
    [ POST => '/health/b', app => 'health-records', '4xx' ],
    [ GET => '/permits/c', counter => 'permits', '5xx' ],
    [ DELETE => '/forms/d', web => 'permits', '2xx' ],
    [ GET => '/tax/e', app => 'tax', '2xx' ],
    [ HEAD => '/health/f', counter => 'health-records', '4xx' ],
);
{
    my @st = map { step($_->[0], $_->[1], $_->[2])->status } @PLAN;
    is("@st", '200 404 503 201 200 404', 'the requests answered');
    like($J // '', $JRE, 'one journey ID, carried in X-Journey-ID');
    ok(wait_events(scalar @PLAN), 'the journey events are in Redis');
}

my $TL;
{
    my $r = timeline();
    is($r->status, 200, 'GET /status/journeys/{id}: 200') or diag $r->raw;
    like($r->header('Content-Type') // '', qr{^application/json\b},
        'application/json');
    like($r->header('ETag') // '', qr/^"[^"]+"$/, 'a strong ETag');
    my $d = $TL = json_of($r) // {};
    is_deeply([ sort keys %$d ],
        [ qw(channels first_seen journey last_seen steps) ], 'members');
    is($d->{journey}, $J, 'journey: the ID');
    is_deeply($d->{channels}, [ qw(web app counter) ],
        'channels touched, in first-seen order');
    my $ev = events();
    like($d->{first_seen} // '', $TS_MS_RE, 'first_seen RFC 3339 ms');
    is(ms_of($d->{first_seen}), $ev->[0]{f}{time}, 'first_seen: first step');
    is(ms_of($d->{last_seen}), $ev->[-1]{f}{time}, 'last_seen: last step');
    my $steps = $d->{steps} || [];
    is(scalar @$steps, scalar @PLAN, 'one step per request');
    is_deeply([ map { join ',', sort keys %$_ } @$steps ],
        [ ('channel,id,outcome,service,time') x @PLAN ],
        'step members: id, time, channel, service, outcome');
    is_deeply([ map { "$_->{channel} $_->{service} $_->{outcome}" } @$steps ],
        [ map { "$_->[2] $_->[3] $_->[4]" } @PLAN ],
        'steps in request order: channel, service, outcome class');
    is_deeply([ map { as_expected($_) } @$steps ], [ map { step_of($_) } @$ev ],
        'steps: the journey stream ids and times');
    is(scalar(grep { ($_->{time} // '') =~ $TS_MS_RE } @$steps),
        scalar @PLAN, 'step times RFC 3339 ms');

    my %k = map { $_ => 1 } all_keys($d);
    is_deeply([ grep { $k{$_} } qw(citizen pseudonym method status
        latency latency_ms eid) ], [], 'no citizen, method, status,'
        . ' latency member');
    (my $body = $r->body) =~ s/\Q$J\E//g;
    unlike($body, qr/\Q$PSEUDO\E/, 'no pseudonym in the body');
    unlike($body, qr/\Q$CITIZEN\E/, 'no citizen identifier in the body');
    unlike($body, qr/\b(?:GET|POST|DELETE|HEAD)\b/, 'no method in the body');
    unlike($body, qr/"(?:200|201|404|503)"|:(?:200|201|404|503)\b/,
        'no status code in the body');

    # journey IDs are case-insensitive, hyphens optional
    (my $loose = lc $J) =~ s/-//g;
    my $l = timeline($loose);
    is($l->status, 200, 'the ID in lower case without hyphens: 200');
    is((json_of($l) // {})->{journey}, $J, '  the canonical ID');

    my $n = timeline(undef, 'If-None-Match' => $r->header('ETag'));
    is($n->status, 304, 'If-None-Match: 304');
    is($n->header('ETag'), $r->header('ETag'), '  with the ETag');
    my $hd = $t->request("/status/journeys/$J", method => 'HEAD');
    is($hd->status, 200, 'HEAD: 200');
    is($hd->body, '', 'HEAD: no body');
    is($hd->header('ETag'), $r->header('ETag'), 'HEAD: the ETag');
}

###########################################################################
# forged, malformed, unknown: the same 404

{
    my $unknown = mint_journey_id($KEY);
    my $forged = mint_journey_id($OTHER);
    # one symbol of the tag changed: the right shape, the wrong tag
    (my $bad_tag = $J) =~ s/-//g;
    substr($bad_tag, 16, 1) = substr($bad_tag, 16, 1) eq 'A' ? 'B' : 'A';
    $bad_tag = join '-', unpack '(A5)4', $bad_tag;
    my %ids = (
        'unknown (valid, never used)' => $unknown,
        'forged (another key)' => $forged,
        'forged (one symbol changed)' => $bad_tag,
        'malformed (short)' => 'XT0YB-EQPHR',
        'malformed (U is not base32)' => 'UUUUU-UUUUU-UUUUU-UUUUU',
        'malformed (word)' => 'journey',
    );
    my (%sig, %bodies);
    for my $name (sort keys %ids) {
        my $r = timeline($ids{$name});
        my %h = %{ $r->headers };
        delete $h{date};
        my $sig = join "\n", $r->status,
            map({ "$_: @{ $h{$_} }" } sort keys %h), $r->body;
        push @{ $sig{$sig} }, $name;
        is($r->status, 404, "$name: 404");
        like($r->header('Content-Type') // '', qr{^application/problem\+json\b},
            "$name: problem+json");
    }
    is(scalar keys %sig, 1, 'the same status, headers (but Date) and body'
        . ' for every one of them') or diag explain \%sig;
    my $s = $t->sse_open("/status/journeys/$forged", close => 1);
    $s->wait_for(sub { $_[0]->closed }, 3);
    is($s->status, 404, 'SSE on a forged ID: 404');
    ok(!$t->redis_query('EXISTS', "cg:{j:$unknown}:timeline"),
        'the unknown ID is still unknown to Redis');
}

###########################################################################
# Server-Sent Events on the journey

{
    my $s = $t->sse_open("/status/journeys/$J");
    $s->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
    is($s->status, 200, 'SSE: 200');
    is($s->header('Content-Type'), 'text/event-stream; charset=utf-8',
        'SSE: text/event-stream');
    my ($snap) = @{ $s->new_events };
    is($snap && $snap->{event}, 'snapshot', 'the first event: snapshot');
    is($snap && $snap->{id}, $TL->{steps}[-1]{id},
        'snapshot id: the last step id');
    is_deeply(json_of($snap && $snap->{data}), $TL,
        'snapshot data: the timeline JSON');

    my $t0 = time;
    is(step(GET => '/tax/g', 'phone')->status, 200, 'a new request (phone)');
    $s->wait_for(sub { @{ $_[0]->events } >= 2 }, 3);
    my ($e) = @{ $s->new_events };
    my $lat = ($e ? $e->{time} : 99) - $t0;
    diag(sprintf 'journey step delivered %.1f ms after the request was sent',
        $lat * 1000);
    cmp_ok($lat, '<', 1, 'the step arrives at once');
    wait_events(@PLAN + 1);
    my $last = step_of(events()->[-1]);
    is($e && $e->{event}, 'step', 'event: step');
    is($e && $e->{id}, $last->{id}, 'id: the step stream id');
    my $d = json_of($e && $e->{data}) // {};
    is_deeply([ sort keys %$d ], [ qw(channel id outcome service time) ],
        'step data members');
    is_deeply(as_expected($d), $last, 'step data: id, time, channel, service,'
        . ' outcome');
    is_deeply(json_of(timeline())->{channels}, [ qw(web app counter phone) ],
        'the timeline now has the phone channel');

    # heartbeats on a journey stream
    $s->pump(2.2);
    cmp_ok(scalar(grep { $_ eq 'heartbeat' } @{ $s->comments }), '>=', 2,
        'heartbeats (1s)');

    # Last-Event-ID: the steps missed, no snapshot
    my $lid = $e && $e->{id};
    $s->close;
    step(GET => '/permits/h', 'sms');
    step(GET => '/tax/i', 'web');
    wait_events(@PLAN + 3);
    my @missed = map { $_->{id} } @{ events() }[-2, -1];
    my $r = $t->sse_open("/status/journeys/$J",
        headers => [ 'Last-Event-ID' => $lid ]);
    $r->wait_for(sub { @{ $_[0]->events } >= 2 }, 3);
    $r->pump(0.3);
    is(join(' ', map { "$_->{event} $_->{id}" } @{ $r->events }),
        join(' ', map { "step $_" } @missed),
        'Last-Event-ID: exactly the two missed steps, no snapshot');
    is_deeply([ map { (json_of($_->{data}) // {})->{outcome} }
        @{ $r->events } ], [ '5xx', '2xx' ], '  their outcomes');
    $r->close;
}

###########################################################################
# long-poll on the journey

{
    my $g = timeline();
    my $e = $g->header('ETag');
    my $t0 = time;
    my $n = timeline(undef, 'If-None-Match' => $e);
    is($n->status, 304, 'no wait: 304');
    my $w = $t->request("/status/journeys/$J?wait=1",
        headers => [ 'If-None-Match' => $e ]);
    my $el = time - $t0;
    is($w->status, 304, 'wait=1, no new step: 304');
    ok($el >= 0.9 && $el < 2.5, sprintf('  at the deadline (%.2f s)', $el));

    my $s = $t->sse_open("/status/journeys/$J?wait=10", accept => undef,
        close => 1, headers => [ 'If-None-Match' => $e ]);
    $s->pump(0.3);
    ok(!$s->head_done, 'wait=10: waiting');
    $t0 = time;
    step(GET => '/health/j', 'email');
    $s->wait_for(sub { $_[0]->closed }, 5);
    my $lat = ($s->first_at // 99) - $t0;
    is($s->status, 200, 'a new step: 200');
    cmp_ok($lat, '<', 1, sprintf('  at once (%.1f ms)', $lat * 1000));
    my $d = json_of($s->body) // {};
    is(scalar @{ $d->{steps} || [] }, @PLAN + 4, '  the new timeline');
    is(($d->{steps} || [ {} ])->[-1]{channel}, 'email', '  ending with the'
        . ' new step');
    isnt($s->header('ETag'), $e, '  a new ETag');
    is($s->header('ETag'), timeline()->header('ETag'), '  the current one');
}

###########################################################################
# a late publication: a step read by a new stream before it is published

sub step_events {
    my ($s) = @_;
    return join ' ', map { "$_->{event} $_->{id}" } @{ $s->events };
}

{
    # a step written into the timeline as the event script does, but not
    # published (yet): as when its publication is late
    my $n = 0;
    my $write = sub {
        my $ms = events()->[-1]{id} =~ /^(\d+)-/ ? $1 : 0;
        my $sid = ($ms + 1 + $n++) . "-0";
        $t->redis_query('RPUSH', "cg:{j:$J}:timeline",
            "$sid $ms web tax 200 GET 1 " . unpack('H*', random_bytes(8))
            . ' ');
        return ($sid, "$sid $ms web tax 200");
    };
    my $publish = sub {
        $t->redis_query('PUBLISH', "cg:{j:$J}:steps", $_[0]);
    };

    my $a = $t->sse_open("/status/journeys/$J");
    $a->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
    my ($snap) = @{ $a->events };
    is($snap && $snap->{event}, 'snapshot', 'late: a stream follows');

    my ($s1, $m1) = $write->();
    my $b = $t->sse_open("/status/journeys/$J");
    $b->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
    is(step_events($b), "snapshot $s1", '  a second stream read the new step'
        . ' before its publication');
    is($publish->($m1), 1, '  then it is published (one subscriber)');
    $a->wait_for(sub { @{ $_[0]->events } >= 2 }, 3);
    $b->pump(0.3);
    is(step_events($a), "snapshot $snap->{id} step $s1",
        '  the stream that was following gets it');
    is(step_events($b), "snapshot $s1", '  the one that read it does not'
        . ' get it again');

    # two steps, read by a third stream, published late and twice
    my ($s2, $m2) = $write->();
    my ($s3, $m3) = $write->();
    my $c = $t->sse_open("/status/journeys/$J",
        headers => [ 'Last-Event-ID' => $s1 ]);
    $c->wait_for(sub { @{ $_[0]->events } >= 2 }, 3);
    is(step_events($c), "step $s2 step $s3", '  a resumed stream read two'
        . ' more');
    $publish->($_) for $m2, $m2, $m3, $m2, $m3;
    sse_pump([ $a, $b, $c ], 3, sub { @{ $a->events } >= 4
        && @{ $b->events } >= 3 });
    $a->pump(0.3);
    is(step_events($a), "snapshot $snap->{id} step $s1 step $s2 step $s3",
        '  published late and again: the followers get each once, in order');
    is(step_events($b), "snapshot $s1 step $s2 step $s3", '  (the second'
        . ' stream too)');
    is(step_events($c), "step $s2 step $s3", '  and the resumed stream'
        . ' nothing again');

    # and a step of a request, published at once, reaches all three
    step(GET => '/tax/k', 'web');
    sse_pump([ $a, $b, $c ], 3, sub { @{ $a->events } >= 5
        && @{ $b->events } >= 4 && @{ $c->events } >= 3 });
    wait_events(@PLAN + 5);
    my $id = events()->[-1]{id};
    is_deeply([ map { $_->events->[-1]{id} } $a, $b, $c ], [ ($id) x 3 ],
        '  a new step then reaches every stream');
    $_->close for $a, $b, $c;
}

$t->done_testing;
