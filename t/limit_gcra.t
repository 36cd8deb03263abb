#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Rate limits, store=local and store=redis: burst + 1 requests pass at once,
# then one per interval; the 429 answer (Retry-After, RateLimit,
# RateLimit-Policy, problem+json); RateLimit headers on passed responses
# only with civicgate_limit_headers on; $civicgate_limit_status;
# civicgate_limit_status 503; an empty key is not limited; metrics move by
# the exact amounts; the Redis key layout.
#
# Timing: the burst is sent sequentially (one connection per request, a
# few ms each) and must complete well within one interval (500 ms at
# 2r/s).  If a slow machine takes longer than half an interval, the
# theoretically admitted count burst + 1 + floor(elapsed / interval) is
# computed and +-1 allowed (reported with a diag); the follow-up checks
# that depend on the exact timing are then skipped.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Digest::SHA qw(sha256_hex);
use JSON::PP ();
use MIME::Base64 qw(decode_base64);
use POSIX qw(ceil);
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $B = 3;           # burst
my $T = 0.5;         # interval at 2r/s, seconds
my $RUN = sprintf '%x', int(rand(2**31));    # keys unique to this run

$t->write_file('file.txt', "static\n");

$t->write_nginx_conf(<<"EOF", worker_processes => 2);
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=1s;

    log_format lim '\$uri \$status "\$civicgate_limit_status"';

    civicgate_limit_zone \$http_x_key zone=loc:1m rate=2r/s store=local;
    civicgate_limit_zone \$http_x_key zone=red:1m rate=2r/s store=redis;
    civicgate_limit_zone \$http_x_key zone=hl:1m rate=2r/s store=local;
    civicgate_limit_zone \$http_x_key zone=hr:1m rate=2r/s store=redis;
    civicgate_limit_zone \$http_x_key zone=s503:1m rate=2r/s;

    server {
        # reuseport: the kernel spreads connections over both workers,
        # so the local store must be shared between them
        listen 127.0.0.1:%%PORT_0%% reuseport;
        server_name localhost;

        access_log %%TESTDIR%%/limit.log lim;
        add_header X-Limit-Status \$civicgate_limit_status always;

        location = /local {
            civicgate_limit zone=loc burst=$B nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /redis {
            civicgate_limit zone=red burst=$B nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /hdr-local {
            civicgate_limit zone=hl burst=$B nodelay;
            civicgate_limit_headers on;
            alias %%TESTDIR%%/file.txt;
        }
        location = /hdr-redis {
            civicgate_limit zone=hr burst=$B nodelay;
            civicgate_limit_headers on;
            alias %%TESTDIR%%/file.txt;
        }
        location = /s503 {
            civicgate_limit zone=s503 nodelay;
            civicgate_limit_status 503;
            alias %%TESTDIR%%/file.txt;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF

$t->run_redis;
$t->run;

my $json = JSON::PP->new;

sub get {
    my ($path, $key) = @_;
    return $t->request($path,
        headers => [ defined $key ? ('X-Key' => $key) : () ]);
}

# n sequential requests; returns (responses, elapsed, start time)
sub burst {
    my ($path, $key, $n) = @_;
    my @r;
    my $t0 = time;
    push @r, get($path, $key) for 1 .. $n;
    return (\@r, time - $t0, $t0);
}

sub statuses { join ' ', map { $_->status } @{ $_[0] } }

sub counts {
    my ($m, $zone) = @_;
    return { map { $_ => metric($m, 'civicgate_limit_requests_total',
        zone => $zone, result => $_) // 'undef' }
        qw(passed delayed rejected delayed_dry_run rejected_dry_run) };
}

# the 429 answer, as the spec describes it
sub check_rejection {
    my ($r, $zone, $name, %o) = @_;
    my $code = $o{status} // 429;
    is($r->status, $code, "$name: status $code");
    is($r->header('X-Limit-Status'), 'REJECTED',
        "$name: \$civicgate_limit_status REJECTED");

    my $ra = $r->header('Retry-After') // '';
    like($ra, qr/^[1-9]\d*$/, "$name: Retry-After is an integer >= 1");

    my @rl = $r->header_list('RateLimit');
    is(scalar @rl, 1, "$name: one RateLimit field");
    my $rl = $rl[0] // '';
    like($rl, qr/^"\Q$zone\E";r=0;t=\d+;pk=:[A-Za-z0-9+\/]+={0,2}:$/,
        "$name: RateLimit \"$zone\";r=0;t=<s>;pk=:<base64>:")
        or diag "RateLimit: $rl";
    my ($tt) = $rl =~ /;t=(\d+);/;
    ok(defined $tt && $ra =~ /^\d+$/ && $ra >= $tt,
        "$name: Retry-After ($ra) >= t (" . ($tt // 'undef') . ')');
    is(join('|', $r->header_list('RateLimit-Policy')), "\"$zone\";q=2;w=1",
        "$name: RateLimit-Policy \"$zone\";q=2;w=1");

    like($r->header('Content-Type') // '', qr{^application/problem\+json\b},
        "$name: Content-Type application/problem+json");
    my $p = eval { $json->decode($r->body // '') };
    ok(ref $p eq 'HASH', "$name: body is a JSON object") or diag $r->body;
    $p = {} unless ref $p eq 'HASH';
    is($p->{type},
        'https://iana.org/assignments/http-problem-types#quota-exceeded',
        "$name: problem type quota-exceeded");
    ok(defined $p->{title} && !ref $p->{title} && length $p->{title},
        "$name: problem title");
    ok(defined $p->{detail} && !ref $p->{detail} && length $p->{detail},
        "$name: problem detail");
    ok(defined $p->{status} && !ref $p->{status}
        && $p->{status} =~ /^\d+$/ && $p->{status} == $code,
        "$name: problem status $code");
    is_deeply($p->{'violated-policies'}, [ $zone ],
        "$name: violated-policies [\"$zone\"]");
    my $pra = $p->{'retry-after'};
    ok(defined $pra && !ref $pra && $pra =~ /^\d+$/ && $ra =~ /^\d+$/
        && $pra == $ra, "$name: problem retry-after equals Retry-After")
        or diag 'retry-after: ' . ($pra // 'undef');
    return ($ra, $rl);
}

###########################################################################
# the burst, on both stores

my %pk;

for my $store (qw(local redis)) {
    my $zone = $store eq 'local' ? 'loc' : 'red';
    my $path = "/$store";
    my $key = "k-$store-$RUN";
    my $m0 = counts($t->metrics, $zone);
    my $K = $B + 1 + 5;

    my ($rs, $el, $t0) = burst($path, $key, $K);
    my $admitted = grep { $_->status == 200 } @$rs;
    my $rejected = grep { $_->status == 429 } @$rs;
    is($admitted + $rejected, $K, "$store: every answer is 200 or 429")
        or diag statuses($rs);
    my $fast = $el < $T / 2;
    if ($fast) {
        is($admitted, $B + 1, "$store: burst=$B: exactly burst + 1 of $K "
            . 'admitted') or diag statuses($rs);
        is(statuses($rs), join(' ', (200) x ($B + 1), (429) x ($K - $B - 1)),
            "$store: the first burst + 1 pass, the rest are rejected");
    } else {
        my $want = $B + 1 + int($el / $T);
        diag(sprintf '%s: burst took %.3f s (more than half an interval): '
            . 'expecting %d +-1', $store, $el, $want);
        ok(abs($admitted - $want) <= 1, "$store: slow burst: $admitted "
            . "admitted, theoretically $want (+-1)");
    }

    my @ok = grep { $_->status == 200 } @$rs;
    is(scalar(grep { ($_->header('X-Limit-Status') // '') eq 'PASSED' } @ok),
        scalar @ok, "$store: passed responses: \$civicgate_limit_status PASSED");
    is(scalar(grep { defined $_->header('RateLimit')
        || defined $_->header('RateLimit-Policy') } @ok), 0,
        "$store: passed responses carry no RateLimit fields (headers off)");
    is(scalar(grep { ($_->body // '') eq "static\n" } @ok), scalar @ok,
        "$store: passed responses serve the file");

    my ($rej) = grep { $_->status == 429 } @$rs;
    my ($ra, $rl) = $rej ? check_rejection($rej, $zone, "$store 429")
        : (undef, undef);
    ($pk{$store}) = ($rl // '') =~ /pk=:([^:]*):/;
    my @pks = map { (($_->header('RateLimit') // '') =~ /pk=:([^:]*):/)[0]
        // '' } grep { $_->status == 429 } @$rs;
    is(scalar(grep { $_ ne ($pk{$store} // '') } @pks), 0,
        "$store: the same key gives the same pk in every rejection");
    unlike(decode_base64($pk{$store} // ''), qr/\Q$key\E/,
        "$store: pk does not carry the raw key");

    my $passed_n = scalar @ok;
    my $rejected_n = $rejected;

    SKIP: {
        skip "$store: burst too slow for the interval checks", 5 unless $fast;

        # one interval after the first request: exactly one more
        my $wait = $t0 + $T + 0.1 - time;
        sleep $wait if $wait > 0;
        my ($rs2) = burst($path, $key, 3);
        is(statuses($rs2), '200 429 429',
            "$store: one interval later exactly one more passes");
        $passed_n += grep { $_->status == 200 } @$rs2;
        $rejected_n += grep { $_->status == 429 } @$rs2;

        # another interval: one more again
        $wait = $t0 + 2 * $T + 0.1 - time;
        sleep $wait if $wait > 0;
        my ($rs3) = burst($path, $key, 2);
        is(statuses($rs3), '200 429', "$store: and one per interval");
        $passed_n += grep { $_->status == 200 } @$rs3;
        $rejected_n += grep { $_->status == 429 } @$rs3;

        # Retry-After is honest: waiting that long is enough
        my $r429 = $rs3->[1];
        my $s = $r429->header('Retry-After') // 1;
        $s = 1 unless $s =~ /^\d+$/;
        ok($s <= 2, "$store: Retry-After ($s) not longer than needed "
            . '(<= ceil of the interval + 1)');
        sleep $s;
        my $r = get($path, $key);
        is($r->status, 200, "$store: a request after Retry-After seconds "
            . 'passes');
        $passed_n++ if $r->status == 200;
        $rejected_n++ if $r->status == 429;
        is($r->header('X-Limit-Status'), 'PASSED',
            "$store: ... with \$civicgate_limit_status PASSED");
    }

    # metrics: exact deltas
    my $m1 = counts($t->metrics, $zone);
    is_deeply({ map { $_ => ($m1->{$_} =~ /^\d+$/ && $m0->{$_} =~ /^\d+$/
            ? $m1->{$_} - $m0->{$_} : "$m0->{$_}..$m1->{$_}") } keys %$m1 },
        { passed => $passed_n, rejected => $rejected_n, delayed => 0,
          delayed_dry_run => 0, rejected_dry_run => 0 },
        "$store: civicgate_limit_requests_total{zone=\"$zone\"} moved by "
        . "$passed_n passed, $rejected_n rejected");

    # the rejection was logged at the default level (error)
    ok($t->wait_for_log(qr/\[error\][^\n]*civicgate: limiting requests, excess: (\d+\.\d{3}) by zone "\Q$zone\E"/),
        "$store: rejection logged at [error] with excess and zone");
}

{
    my @ex = $t->error_log =~ /civicgate: limiting requests, excess: (\d+\.\d{3}) by zone "(?:loc|red)"/g;
    is(scalar(grep { $_ < $B || $_ > $B + 1 } @ex), 0,
        "logged excess values lie in [$B, " . ($B + 1) . '] intervals')
        or diag "@ex";
    unlike($t->error_log, qr/k-(?:local|redis)-\Q$RUN\E/,
        'the raw key value is in no log line');
}

###########################################################################
# the Redis key: cg:{l:<digest>}:red, a TAT in µs with PX expiry

{
    my $key = "k-redis-$RUN";
    # no civicgate_secret_file: plain SHA-256 of the key value (first 16
    # bytes as 32 hex digits)
    my $digest = substr(sha256_hex($key), 0, 32);
    my @keys = $t->redis_scan_keys('cg:{l:*');
    ok(scalar(grep { $_ eq "cg:{l:$digest}:red" } @keys),
        'Redis key cg:{l:<sha256 of the key value, 32 hex>}:red')
        or diag "keys: @keys";
    is(scalar(grep { !/^cg:\{l:[0-9a-f]{32}\}:[a-z0-9_-]+$/ } @keys), 0,
        'every limit key has the layout cg:{l:<32 hex>}:<zone>')
        or diag "@keys";
    is(scalar(grep { /:loc$|:hl$/ } @keys), 0,
        'store=local zones write nothing to Redis');
    is(scalar(grep { /\Q$key\E/ } @keys), 0, 'the raw key is in no Redis key');

    my ($tat, $pttl, $now) = $t->redis_pipeline(
        [ 'GET', "cg:{l:$digest}:red" ], [ 'PTTL', "cg:{l:$digest}:red" ],
        [ 'TIME' ]);
    my $now_us = ref $now ? $now->[0] * 1000000 + $now->[1] : 0;
    ok(defined $tat && $tat =~ /^\d+$/, 'the value is an integer (µs)')
        or diag explain $tat;
    $tat //= 0;
    ok($tat > $now_us && $tat <= $now_us + ($B + 1) * $T * 1e6,
        'the TAT lies within (burst + 1) intervals after Redis TIME')
        or diag "tat $tat now $now_us";
    ok(defined $pttl && $pttl > 0 && $pttl <= ($B + 1) * $T * 1000 + 1,
        "the key expires when drained (PTTL $pttl ms)");
    ok($pttl >= ($tat - $now_us) / 1000 - 50,
        'the expiry is not before the TAT');
}

###########################################################################
# civicgate_limit_headers on: RateLimit fields on passed responses too

for my $store (qw(local redis)) {
    my $zone = $store eq 'local' ? 'hl' : 'hr';
    my $key = "h-$store-$RUN";
    my $K = $B + 3;
    my ($rs, $el) = burst("/hdr-$store", $key, $K);
    SKIP: {
        skip "$store: burst too slow (${el}s)", 4 unless $el < $T / 2;
        is(statuses($rs), join(' ', (200) x ($B + 1), (429) x ($K - $B - 1)),
            "headers on, $store: burst + 1 pass");
        my @want = map {
            # request k (1-based) found excess (k-1) intervals: r = B-(k-1),
            # t = ceil(k * interval) seconds until drained
            my $k = $_;
            qr/^"\Q$zone\E";r=@{[ $B - $k + 1 ]};t=@{[ ceil($k * $T) ]};pk=:[A-Za-z0-9+\/]+={0,2}:$/
        } 1 .. $B + 1;
        my @got = map { $_->header('RateLimit') // '' } @$rs[0 .. $B];
        my $bad = grep { $got[$_] !~ $want[$_] } 0 .. $B;
        ok(!$bad, "headers on, $store: RateLimit r counts down from $B, t "
            . 'grows by the interval') or diag explain \@got;
        is(scalar(grep { ($_->header('RateLimit-Policy') // '') eq
            "\"$zone\";q=2;w=1" } @$rs[0 .. $B]), $B + 1,
            "headers on, $store: RateLimit-Policy on every passed response");
        my ($pk1) = ($got[0] =~ /pk=:([^:]*):/);
        my ($pk2) = (($rs->[-1]->header('RateLimit') // '') =~ /pk=:([^:]*):/);
        is($pk2, $pk1, "headers on, $store: same pk passed and rejected");
    }
    check_rejection($rs->[-1], $zone, "headers on, $store 429");
}

isnt($pk{local} // '', $pk{redis} // 'x',
    'different keys give different pk values');

###########################################################################
# civicgate_limit_status 503, default store (redis with civicgate_redis)

{
    my $key = "s-$RUN";
    my ($rs) = burst('/s503', $key, 2);
    is($rs->[0]->status, 200, 'status 503: first request passes (burst 0)');
    check_rejection($rs->[1], 's503', 'civicgate_limit_status 503',
        status => 503);
    my $digest = substr(sha256_hex($key), 0, 32);
    ok(scalar(grep { $_ eq "cg:{l:$digest}:s503" }
        $t->redis_scan_keys('cg:{l:*')),
        'a zone without store= uses Redis when civicgate_redis is set');
}

###########################################################################
# an empty key is not limited

{
    my $m0 = counts($t->metrics, 'loc');
    my $mark = length($t->read_file('limit.log') // '');
    my ($rs) = burst('/local', undef, 10);
    is(statuses($rs), join(' ', (200) x 10), 'empty key: 10 of 10 pass');
    is(scalar(grep { defined $_->header('X-Limit-Status') } @$rs), 0,
        'empty key: no X-Limit-Status header (variable not set)');
    is(scalar(grep { defined $_->header('RateLimit') } @$rs), 0,
        'empty key: no RateLimit field');
    ok($t->wait_until(sub {
            my $l = substr($t->read_file('limit.log') // '', $mark);
            (() = $l =~ m{^/local 200 }mg) >= 10 }, timeout => 3),
        'empty key: 10 access log lines');
    my $l = substr($t->read_file('limit.log') // '', $mark);
    my @v = $l =~ m{^/local 200 "([^"]*)"$}mg;
    is(scalar(grep { $_ eq '-' } @v), 10,
        'empty key: $civicgate_limit_status not found ("-" in the log)')
        or diag $l;
    is_deeply(counts($t->metrics, 'loc'), $m0,
        'empty key: no limit metric moved');
}

# the access log agrees with the answers
{
    my $l = $t->read_file('limit.log') // '';
    is(scalar(grep { !/^\S+ 429 "REJECTED"$/ } grep { / 429 / } split /\n/,
        $l), 0, 'access log: every 429 has REJECTED');
    is(scalar(grep { !/^\S+ 200 "(?:PASSED|-)"$/ } grep { / 200 / }
        split /\n/, $l), 0, 'access log: every 200 has PASSED (or - without '
        . 'limits)');
}

$t->done_testing;
