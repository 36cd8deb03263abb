#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Journey events in Redis: one event per request of a journey, with the
# exact fields in the exact order, in the journey stream and in the global
# stream cg:events; the journey summary, the citizen index, TTLs;
# latency_ms for proxied requests; "civicgate_events off"; no raw citizen
# identifier anywhere in Redis; consumer groups read the global stream.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JRE = journey_id_re();
my @FIELDS = qw(time eid journey channel service method status latency_ms
    citizen);

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on ttl=1h;
        civicgate_channel $http_x_channel;
        civicgate_citizen $http_x_citizen_id;

        location /ret {
            civicgate_service svc-return;
            return 200 "ok\n";
        }
        location /missing {
            civicgate_service svc-missing;
            return 404;
        }
        location /proxy {
            civicgate_service svc-proxy;
            proxy_pass http://127.0.0.1:%%PORT_1%%/backend;
        }
        location /off {
            civicgate_events off;
            civicgate_service svc-off;
            return 200 "off\n";
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }

        # subrequests and internal redirects: still one main request
        location /authed {
            civicgate_service svc-authed;
            auth_request /_check;
            return 200 "authed\n";
        }
        location = /_check {
            internal;
            civicgate_service svc-check;
            return 204;
        }
        location /redirected {
            civicgate_service svc-redirected;
            error_page 404 = @fallback;
            return 404;
        }
        location @fallback {
            civicgate_service svc-fallback;
            return 200 "fallback\n";
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name backend;
        location / {
            return 201 "backend\n";
        }
    }
EOF

$t->run_redis;
$t->run;

# an event logged before the worker's connection is set up waits in the
# spool (as designed); the metrics below count none spooled
ok($t->wait_until(sub {
    (metric($t->metrics, 'civicgate_redis_connections', role => 'command')
        // 0) >= 1 }, timeout => 10),
    "the worker's Redis connection is set up before the first event");

my $CITIZEN = 'CZ-' . unpack('H*', random_bytes(6)) . '-raw';
my $PSEUDO = pseudonym($KEY, $CITIZEN);

###########################################################################
# one journey, N requests over several channels, methods and locations

# [path, method, channel header, expected channel, service, status, proxied]
my @plan;
my @chan = (
    [ 'sms' => 'sms' ], [ 'web' => 'web' ], [ 'SMS' => 'sms' ],
    [ 'app' => 'app' ], [ 'Counter' => 'counter' ], [ 'web' => 'web' ],
    [ 'counter' => 'counter' ], [ 'app' => 'app' ],
);
my @loc = (
    [ '/ret', 'svc-return', 200, 0 ],
    [ '/proxy', 'svc-proxy', 201, 1 ],
    [ '/missing', 'svc-missing', 404, 0 ],
);
my @meth = qw(GET POST HEAD GET DELETE);
my $N = 30;
for my $i (0 .. $N - 1) {
    my $c = $chan[$i % @chan];
    my $l = $loc[$i % @loc];
    my $m = $meth[$i % @meth];
    push @plan, { path => $l->[0] . "?i=$i", method => $m,
        channel_in => $c->[0], channel => $c->[1], service => $l->[1],
        status => $l->[2], proxied => $l->[3] };
}

my ($JOURNEY, $bad_resp) = (undef, 0);
my $t_start = int(time * 1000);
for my $p (@plan) {
    my @h = ('X-Channel' => $p->{channel_in}, 'X-Citizen-Id' => $CITIZEN);
    push @h, 'X-Journey-ID' => $JOURNEY if defined $JOURNEY;
    my $r = $t->request($p->{path}, method => $p->{method}, headers => \@h,
        ($p->{method} eq 'POST' ? (body => 'a=1') : ()));
    $bad_resp++ unless $r->status == $p->{status};
    my $j = $r->header('X-Journey-ID') // '';
    $JOURNEY //= $j;
    $bad_resp++ unless $j eq $JOURNEY;
}
my $t_end = int(time * 1000);
is($bad_resp, 0, "$N requests answered as configured, one journey");
like($JOURNEY, $JRE, 'journey ID');

my $JS = "cg:{j:$JOURNEY}:timeline";
my $CZ = "cg:{c:$PSEUDO}:journeys";

ok($t->wait_until(sub {
    $t->journey_length($JOURNEY) >= $N
}, timeout => 5), "journey timeline reaches $N entries")
    or diag 'LLEN ' . $t->journey_length($JOURNEY);

my $ev = $t->journey_timeline($JOURNEY);
is(scalar @$ev, $N, "journey timeline has exactly $N entries");

my (%eids, @field_bad, @value_bad);
for my $k (0 .. $#$ev) {
    my $e = $ev->[$k];
    my $p = $plan[$k];
    my $f = $e->{f};
    push @field_bad, "$k: " . scalar(@{ $e->{fields} }) . " fields: $e->{raw}"
        unless @{ $e->{fields} } == 9 && $e->{id} =~ /^\d+-\d+$/;
    $eids{ $f->{eid} // '' }++;
    my @why;
    push @why, "time $f->{time}" unless ($f->{time} // '') =~ /^\d{13}$/
        && $f->{time} >= $t_start - 1000 && $f->{time} <= $t_end + 1000;
    push @why, "time not ascending"
        if $k && ($f->{time} // 0) < ($ev->[$k - 1]{f}{time} // 0);
    push @why, "eid $f->{eid}" unless ($f->{eid} // '') =~ /^[0-9a-f]{16}$/i;
    push @why, "journey $f->{journey}" unless ($f->{journey} // '') eq $JOURNEY;
    push @why, "channel $f->{channel} != $p->{channel}"
        unless ($f->{channel} // '') eq $p->{channel};
    push @why, "service $f->{service} != $p->{service}"
        unless ($f->{service} // '') eq $p->{service};
    push @why, "method $f->{method} != $p->{method}"
        unless ($f->{method} // '') eq $p->{method};
    push @why, "status $f->{status} != $p->{status}"
        unless ($f->{status} // '') eq $p->{status};
    if ($p->{proxied}) {
        push @why, "latency_ms '$f->{latency_ms}' not a number"
            unless ($f->{latency_ms} // '') =~ /^\d+$/
                && $f->{latency_ms} < 5000;
    } else {
        push @why, "latency_ms '$f->{latency_ms}' not empty"
            unless ($f->{latency_ms} // 'x') eq '';
    }
    push @why, "citizen $f->{citizen}" unless ($f->{citizen} // '') eq $PSEUDO;
    push @value_bad, "event $k: " . join('; ', @why) if @why;
}
is_deeply(\@field_bad, [], 'every timeline entry: "SID '
    . join(' ', @Civicgate::Test::TIMELINE_FIELDS[1 .. 8]) . '"');
is_deeply(\@value_bad, [], 'every event: values and order match the requests')
    or diag explain [ map { $_->{fields} } @$ev[0 .. 2] ];
is(scalar(grep { length } keys %eids), $N, "$N distinct eids");

###########################################################################
# the global stream

my %global;
{
    my $g = $t->redis_stream('cg:events');
    for my $e (@$g) {
        push @{ $global{ $e->{f}{eid} // '' } }, $e;
    }
    my ($missing, $diff, $names) = (0, 0, 0);
    for my $e (@$ev) {
        my $ge = $global{ $e->{f}{eid} };
        unless ($ge) { $missing++; next }
        $names++ unless "@{ $ge->[0]{names} }" eq "@FIELDS";
        $diff++ unless $ge->[0]{id} eq $e->{id}
            && join("\0", map { $ge->[0]{f}{$_} } @FIELDS)
               eq join("\0", map { $e->{f}{$_} } @FIELDS);
    }
    is($missing, 0, 'cg:events has every event of the journey (by eid)');
    is($names, 0, 'cg:events entries: fields ' . join(',', @FIELDS)
        . ' in this order');
    is($diff, 0, 'cg:events entries: the same values, their ID the SID');
    is(scalar @$g, $N, "cg:events has $N entries");
}

###########################################################################
# summary (derived from the timeline), citizen index, TTLs

{
    my $s = $t->journey_summary($JOURNEY);
    my @seen;
    for my $p (@plan) {
        push @seen, $p->{channel} unless grep { $_ eq $p->{channel} } @seen;
    }
    is($s->{first_seen}, $ev->[0]{f}{time}, 'summary: first_seen = first event');
    is($s->{last_seen}, $ev->[-1]{f}{time}, 'summary: last_seen = last event');
    ok($s->{first_seen} <= $s->{last_seen}, 'summary: first_seen <= last_seen');
    is($s->{channels}, join(',', @seen), 'summary: channels in first-seen order');
    is($s->{events}, $N, "summary: events = $N");
    is($s->{last_status}, $plan[-1]{status}, 'summary: last_status');
    is($s->{last_service}, $plan[-1]{service}, 'summary: last_service');
    is($s->{last_channel}, $plan[-1]{channel}, 'summary: last_channel');
    is($s->{citizen}, $PSEUDO, 'summary: citizen pseudonym');

    my $z = $t->redis_query('ZRANGE', $CZ, 0, -1, 'WITHSCORES');
    is_deeply($z, [ $JOURNEY, $s->{first_seen} ],
        'citizen index: the journey, scored with its first event');

    for my $k ($JS, $CZ) {
        my $ttl = $t->redis_query('TTL', $k);
        ok($ttl > 0 && $ttl <= 3600, "TTL of $k in (0, 3600] (ttl=1h)")
            or diag "TTL $ttl";
    }
}

###########################################################################
# a second journey without a citizen; events off

my $J2;
{
    for my $i (1 .. 3) {
        my $r = $t->request('/ret', headers => [ 'X-Channel' => 'email',
            (defined $J2 ? ('X-Journey-ID' => $J2) : ()) ]);
        $J2 //= $r->header('X-Journey-ID');
    }
    ok($t->wait_until(sub { $t->journey_length($J2) >= 3 }),
        'journey without citizen: 3 events');
    my $e = $t->journey_timeline($J2);
    is_deeply([ map { $_->{f}{citizen} } @$e ], [ '', '', '' ],
        'journey without citizen: citizen field empty');
    is_deeply([ map { $_->{f}{channel} } @$e ], [ ('email') x 3 ],
        'journey without citizen: channel');
    my $s = $t->journey_summary($J2);
    ok(!defined $s->{citizen} || $s->{citizen} eq '',
        'summary without citizen: no pseudonym');
    is($s->{events}, 3, 'summary without citizen: events = 3');
    my $ttl = $t->redis_query('TTL', "cg:{j:$J2}:timeline");
    ok($ttl > 0 && $ttl <= 3600, 'timeline without citizen: TTL');

    # events off: the same journey and a new one, nothing written
    my $before = $t->redis_query('XLEN', 'cg:events');
    for (1 .. 5) {
        my $r = $t->request('/off', headers => [ 'X-Journey-ID' => $JOURNEY,
            'X-Channel' => 'web', 'X-Citizen-Id' => $CITIZEN ]);
        is($r->header('X-Journey-ID'), $JOURNEY, 'events off: journey still on')
            if $_ == 1;
    }
    my $r = $t->request('/off', headers => [ 'X-Channel' => 'web' ]);
    my $J3 = $r->header('X-Journey-ID');
    like($J3 // '', $JRE, 'events off: a journey is minted');
    # the next written event is a marker: every earlier event is in by then
    $t->request('/ret', headers => [ 'X-Journey-ID' => $J2,
        'X-Channel' => 'phone' ]);
    ok($t->wait_until(sub { $t->journey_length($J2) >= 4 }),
        'marker event written');
    is($t->redis_query('XLEN', 'cg:events'), $before + 1,
        'events off: nothing in cg:events');
    is($t->journey_length($JOURNEY), $N, 'events off: journey timeline unchanged');
    is($t->redis_query('EXISTS', "cg:{j:$J3}:timeline"), 0,
        'events off: no keys for a journey seen only there');
}

###########################################################################
# subrequests (auth_request) and internal redirects: one event per request

my $J4;
{
    my $bad = 0;
    for my $p (qw(/authed /redirected /authed /redirected)) {
        my $r = $t->request($p, headers => [ 'X-Channel' => 'app',
            (defined $J4 ? ('X-Journey-ID' => $J4) : ()) ]);
        $bad++ unless $r->status == 200;
        $J4 //= $r->header('X-Journey-ID');
    }
    is($bad, 0, 'auth_request and error_page locations answer 200');
    # marker: the next event of journey 2 comes after these four
    $t->request('/ret', headers => [ 'X-Journey-ID' => $J2,
        'X-Channel' => 'phone' ]);
    ok($t->wait_until(sub { $t->journey_length($J2) >= 5 }),
        'marker event written');
    my $e = $t->journey_timeline($J4);
    is(scalar @$e, 4, 'one event per main request (no subrequest event)');
    is(scalar(grep { $_->{f}{service} eq 'svc-check' } @$e), 0,
        'no event for the auth_request subrequest');
    is_deeply([ map { $_->{f}{status} } @$e ], [ 200, 200, 200, 200 ],
        'status of the main requests');
}

###########################################################################
# the complete key space; no raw citizen identifier anywhere

{
    my @keys = $t->redis_scan_keys;
    is_deeply(\@keys, [ sort('cg:events', $JS, $CZ,
            "cg:{j:$J2}:timeline", "cg:{j:$J4}:timeline") ],
        'Redis holds exactly the expected keys');

    # the same search finds the pseudonym (control: the search works)
    my (@found, %control);
    for my $k (@keys) {
        push @found, "key name $k" if index($k, $CITIZEN) >= 0;
        $control{"key name $k"} = 1 if index($k, $PSEUDO) >= 0;
        my $type = $t->redis_query('TYPE', $k);
        my @cmds = ([ 'DUMP', $k ]);
        push @cmds, [ 'XRANGE', $k, '-', '+' ] if $type eq 'stream';
        push @cmds, [ 'HGETALL', $k ] if $type eq 'hash';
        push @cmds, [ 'ZRANGE', $k, 0, -1, 'WITHSCORES' ] if $type eq 'zset';
        push @cmds, [ 'GET', $k ] if $type eq 'string';
        push @cmds, [ 'LRANGE', $k, 0, -1 ] if $type eq 'list';
        push @cmds, [ 'SMEMBERS', $k ] if $type eq 'set';
        my @rep = $t->redis_pipeline(@cmds);
        for my $i (0 .. $#cmds) {
            my @flat = _flatten($rep[$i]);
            push @found, "$cmds[$i][0] $k"
                if grep { defined && index($_, $CITIZEN) >= 0 } @flat;
            $control{"$cmds[$i][0] $k"} = 1
                if grep { defined && index($_, $PSEUDO) >= 0 } @flat;
        }
    }
    is_deeply(\@found, [], 'the raw citizen identifier is nowhere in Redis');
    ok($control{"LRANGE $JS"}
        && $control{"XRANGE cg:events"} && $control{"key name $CZ"},
        'control: the same search finds the pseudonym')
        or diag explain \%control;
    unlike($t->error_log, qr/\Q$CITIZEN\E/,
        'the raw citizen identifier is not in error.log');
    ok(scalar(grep { $_ eq $CZ } @keys), 'citizen index key uses the pseudonym');
}

sub _flatten {
    my ($v) = @_;
    return ref $v eq 'ARRAY' ? map { _flatten($_) } @$v : ($v);
}

###########################################################################
# consumer group on the global stream

{
    my $total = $t->redis_query('XLEN', 'cg:events');
    is($t->redis_query('XGROUP', 'CREATE', 'cg:events', 'g', '0'), 'OK',
        'XGROUP CREATE cg:events g 0');
    my $r = $t->redis_query('XREADGROUP', 'GROUP', 'g', 'c1', 'COUNT', 10000,
        'STREAMS', 'cg:events', '>');
    my @entries = $r ? @{ $r->[0][1] } : ();
    is(scalar @entries, $total, "XREADGROUP delivers all $total events");
    my %got = map { my %f = @{ $_->[1] }; ($f{eid} => 1) } @entries;
    is(scalar(grep { $got{ $_->{f}{eid} } } @$ev), $N,
        'XREADGROUP: every event of the journey among them');
    my $more = $t->redis_query('XREADGROUP', 'GROUP', 'g', 'c1', 'COUNT', 10,
        'STREAMS', 'cg:events', '>');
    ok(!$more || !@{ $more->[0][1] }, 'XREADGROUP: nothing left');
}

###########################################################################
# metrics

{
    my $written = $N + 3 + 1 + 4 + 1;
    my $m = $t->metrics;
    is(metric($m, 'civicgate_events_total', result => 'written'), $written,
        "events_total{result=written} = $written");
    is(metric($m, 'civicgate_events_total', result => 'spooled'), 0,
        'events_total{result=spooled} = 0');
    is(metric($m, 'civicgate_events_total', result => 'dropped'), 0,
        'events_total{result=dropped} = 0');
    is(metric($m, 'civicgate_events_total', result => 'failed'), 0,
        'events_total{result=failed} = 0');
    # the metrics fetches themselves wrote nothing
    $m = $t->metrics;
    is(metric($m, 'civicgate_events_total', result => 'written'), $written,
        'metrics location (events off) writes no event');
    is($t->redis_query('XLEN', 'cg:events'), $written,
        "cg:events has $written entries");
}

$t->done_testing;
