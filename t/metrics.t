#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The metrics page against a strict parser of the Prometheus text format
# 0.0.4 (HELP and TYPE before the samples, names, label escaping, values,
# no duplicate series, counters in _total, histograms cumulative to +Inf
# with _count equal to +Inf), on every scrape; with two workers, each
# series moves by exactly what the test's requests should move it
# (requests by channel, service and status class, journeys, limits,
# consent checks and changes, events, Redis commands, histogram counts);
# counters survive a reload; gauges are summed over workers, come back
# from a worker killed, and leave with the workers of a reload; Redis
# errors by kind; a reload that changes the series starts from zero.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
my $OTHER = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);
$t->write_file('ok.txt', "ok\n");

my $CONF = <<'EOF';
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_channels web app sms;
    civicgate_citizen $http_x_citizen_id;

    civicgate_limit_zone $http_x_key zone=lz:1m rate=1r/m store=local;
    civicgate_consent_purposes {
        health "Kesehatan" "Health";
        tax    "Pajak"     "Tax";
    }
    civicgate_consent_cache zone=consent:1m ttl=60s;

    server {
        listen 127.0.0.1:%%PORT_0%% reuseport;
        server_name localhost;
        civicgate_channel $http_x_channel;

        location /tax/ {
            civicgate_service tax;
            civicgate_journey on;
            return 200 "$pid\n";
        }
        location /permits/ {
            civicgate_service permits;
            return 404;
        }
        location /broken {
            civicgate_service permits;
            return 500;
        }
        location /moved {
            civicgate_service tax;
            return 301 /tax/;
        }
        location /plain {
            return 200 "$pid\n";
        }
        location /lim {
            civicgate_service tax;
            civicgate_limit zone=lz;
            alias %%TESTDIR%%/ok.txt;
        }
        location /c {
            civicgate_service health;
            civicgate_consent health;
            alias %%TESTDIR%%/ok.txt;
        }
        location /consents/ {
            civicgate_service consents;
            civicgate_consent_api;
        }
        @EXTRA@
        location = /metrics {
            civicgate_service scrape;
            civicgate_metrics;
        }
    }
EOF

sub write_conf {
    my ($extra) = @_;
    (my $c = $CONF) =~ s/\@EXTRA\@/$extra \/\/ ''/e;
    $t->write_nginx_conf($c, worker_processes => 2);
}

write_conf('');
$t->run_redis;
$t->run;

###########################################################################
# a strict parser of the text exposition format

my $NAME = qr/[a-zA-Z_:][a-zA-Z0-9_:]*/;
my $LABEL = qr/[a-zA-Z_][a-zA-Z0-9_]*/;
my $VALUE = qr/(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?
                 |[+-]?Inf|NaN)/x;
my %TYPES = map { $_ => 1 } qw(counter gauge histogram summary untyped);

sub label_key {
    my ($name, @l) = @_;
    return $name unless @l;
    my @p;
    for (my $i = 0; $i < @l; $i += 2) {
        push @p, "$l[$i]=\"$l[$i + 1]\"";
    }
    return $name . '{' . join(',', @p) . '}';
}

sub parse_labels {
    my ($s, $err) = @_;
    my (@l, %seen);
    pos($s) = 0;
    return ([], $s) unless $s =~ /\G\{/gc;
    while (1) {
        last if $s =~ /\G\}/gc;
        unless ($s =~ /\G($LABEL)="((?:[^"\\\n]|\\[\\"n])*)"/gc) {
            push @$err, "bad label syntax at " . substr($s, pos($s) // 0, 20);
            return (undef, '');
        }
        my ($k, $v) = ($1, $2);
        push @$err, "reserved label name $k" if $k =~ /^__/;
        push @$err, "label $k repeated" if $seen{$k}++;
        push @l, $k, $v;
        next if $s =~ /\G,/gc;
        next if $s =~ /\G(?=\})/gc;
        push @$err, "bad label separator";
        return (undef, '');
    }
    return (\@l, substr($s, pos($s)));
}

# returns { values => { key => number }, types => { family => type },
# families => [ names in order ] } and the list of violations
sub prom_parse {
    my ($text) = @_;
    my (@err, %fam, @order, %series, %closed, $cur);

    push @err, 'body does not end with a newline' unless $text =~ /\n\z/;

    my $n = 0;
    for my $line (split /\n/, $text) {
        $n++;
        if ($line =~ /^#/) {
            next unless $line =~ /^# (HELP|TYPE) /;
            unless ($line =~ /^# (HELP|TYPE) ($NAME)(?: (.*))?$/) {
                push @err, "$n: bad $1 line";
                next;
            }
            my ($kw, $name, $rest) = ($1, $2, $3 // '');
            if (defined $cur && $cur ne $name) {
                $closed{$cur} = 1;
            }
            push @err, "$n: $kw of $name after its samples or apart"
                if $closed{$name} || ($fam{$name} && @{ $fam{$name}{s} });
            my $f = $fam{$name} //= do { push @order, $name; { s => [] } };
            $cur = $name;
            if ($kw eq 'HELP') {
                push @err, "$n: second HELP of $name" if defined $f->{help};
                (my $unescaped = $rest) =~ s/\\[\\n]//g;
                push @err, "$n: bad escape in HELP of $name"
                    if $unescaped =~ /\\/;
                $f->{help} = $rest;
            } else {
                push @err, "$n: second TYPE of $name" if defined $f->{type};
                push @err, "$n: unknown TYPE $rest" unless $TYPES{$rest};
                $f->{type} = $rest;
            }
            next;
        }
        next if $line =~ /^\s*$/;

        unless ($line =~ /^($NAME)(.*)$/) {
            push @err, "$n: no metric name: $line";
            next;
        }
        my ($name, $tail) = ($1, $2);
        my ($labels, $after) = parse_labels($tail, \@err);
        next unless defined $labels;
        unless ($after =~ /^[ \t]+($VALUE)(?:[ \t]+-?[0-9]+)?$/) {
            push @err, "$n: bad value in: $line";
            next;
        }
        my $value = $1;

        my $family = $name;
        my ($base) = $name =~ /^(.*)_(?:bucket|sum|count)$/;
        if (!$fam{$name} && defined $base && $fam{$base}
            && ($fam{$base}{type} // '') =~ /^(?:histogram|summary)$/)
        {
            $family = $base;
        }
        my $f = $fam{$family};
        unless ($f && defined $f->{help} && defined $f->{type}) {
            push @err, "$n: sample of $name without HELP and TYPE before it";
            next;
        }
        push @err, "$n: samples of $family not together"
            if $closed{$family} || $cur ne $family;

        my $key = label_key($name, @$labels);
        my %l = @$labels;
        my $sorted = $name . join ',', map { "$_=$l{$_}" } sort keys %l;
        push @err, "$n: duplicate series $key" if $series{$sorted}++;

        push @{ $f->{s} }, { name => $name, labels => $labels, key => $key,
            value => $value eq 'NaN' ? 'NaN' : $value + 0, raw => $value };
    }

    my %values;
    for my $family (@order) {
        my $f = $fam{$family};
        my $type = $f->{type} // 'untyped';
        for my $s (@{ $f->{s} }) {
            $values{ $s->{key} } = $s->{value};
        }
        if ($type eq 'counter') {
            push @err, "counter $family does not end in _total"
                unless $family =~ /_total$/;
            for my $s (@{ $f->{s} }) {
                push @err, "counter $s->{key} is $s->{raw}"
                    unless $s->{raw} =~ /^[0-9.e+]+$/ && $s->{value} >= 0;
                push @err, "counter sample $s->{name} of $family"
                    unless $s->{name} eq $family;
            }
        } elsif ($type eq 'gauge') {
            for my $s (@{ $f->{s} }) {
                push @err, "gauge sample $s->{name} of $family"
                    unless $s->{name} eq $family;
            }
        } elsif ($type eq 'histogram') {
            push @err, histogram_errors($family, $f->{s});
        }
    }

    return ({ values => \%values,
              types => { map { $_ => $fam{$_}{type} } @order },
              families => \@order }, \@err);
}

sub histogram_errors {
    my ($family, $samples) = @_;
    my (@err, %g, @gorder);
    for my $s (@$samples) {
        my @l = @{ $s->{labels} };
        my ($le, @rest);
        for (my $i = 0; $i < @l; $i += 2) {
            if ($l[$i] eq 'le') { $le = $l[$i + 1] } else { push @rest, @l[$i, $i + 1] }
        }
        my $gk = label_key('', @rest);
        push @gorder, $gk unless $g{$gk};
        my $grp = $g{$gk} //= { buckets => [] };
        if ($s->{name} eq "${family}_bucket") {
            if (!defined $le) {
                push @err, "$s->{key}: bucket without le";
            } else {
                push @{ $grp->{buckets} }, [ $le, $s->{value} ];
            }
        } elsif ($s->{name} eq "${family}_sum") {
            push @err, "$s->{key}: le on _sum" if defined $le;
            $grp->{sum} = $s->{value};
        } elsif ($s->{name} eq "${family}_count") {
            push @err, "$s->{key}: le on _count" if defined $le;
            $grp->{count} = $s->{value};
        } else {
            push @err, "$s->{key}: not a histogram sample of $family";
        }
    }
    for my $gk (@gorder) {
        my $grp = $g{$gk};
        my @b = @{ $grp->{buckets} };
        unless (@b) {
            push @err, "$family$gk: no buckets";
            next;
        }
        push @err, "$family$gk: last bucket is le=\"$b[-1][0]\", not +Inf"
            unless $b[-1][0] eq '+Inf';
        my ($prev_le, $prev_v) = (undef, 0);
        for my $b (@b) {
            my $le = $b->[0] eq '+Inf' ? 9**9**9 : $b->[0];
            push @err, "$family$gk: le=\"$b->[0]\" is not a number"
                unless $b->[0] eq '+Inf' || $b->[0] =~ /^$VALUE$/;
            push @err, "$family$gk: le=\"$b->[0]\" not increasing"
                if defined $prev_le && $le <= $prev_le;
            push @err, "$family$gk: bucket le=\"$b->[0]\" $b->[1] below the "
                . "previous $prev_v (not cumulative)" if $b->[1] < $prev_v;
            ($prev_le, $prev_v) = ($le, $b->[1]);
        }
        push @err, "$family$gk: no _sum" unless defined $grp->{sum};
        if (!defined $grp->{count}) {
            push @err, "$family$gk: no _count";
        } elsif ($grp->{count} != $b[-1][1]) {
            push @err, "$family$gk: _count $grp->{count} != +Inf bucket "
                . $b[-1][1];
        }
    }
    return @err;
}

# the parser itself rejects what it must
{
    my @bad = (
        [ "x_total 1\n", 'sample before HELP/TYPE' ],
        [ "# HELP x_total h\n# TYPE x_total counter\nx_total 1\nx_total 2\n",
          'duplicate series' ],
        [ "# HELP x h\n# TYPE x counter\nx 1\n", 'counter not _total' ],
        [ "# HELP x_total h\n# TYPE x_total counter\nx_total{a=\"b\\q\"} 1\n",
          'bad label escape' ],
        [ "# HELP x_total h\n# TYPE x_total counter\nx_total 1.2.3\n",
          'bad value' ],
        [ "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
          . "h_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", 'not cumulative' ],
        [ "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
          . "h_sum 1\nh_count 2\n", 'no +Inf' ],
        [ "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\n"
          . "h_sum 1\nh_count 3\n", '_count != +Inf' ],
        [ "# HELP g h\n# TYPE g gauge\ng 1\n# HELP y h\n# TYPE y gauge\n"
          . "y 1\ng{a=\"1\"} 2\n", 'interleaved families' ],
        [ "# HELP g h\n# TYPE g gauges\ng 1\n", 'unknown type' ],
        [ "# HELP 1g h\n# TYPE 1g gauge\n", 'bad name' ],
    );
    for my $b (@bad) {
        my (undef, $err) = prom_parse($b->[0]);
        ok(@$err, "parser rejects: $b->[1]");
    }
    my (undef, $err) = prom_parse("# HELP g a \\\\ b\n# TYPE g gauge\n"
        . "g{a=\"x\\\"y\\\\z\\n\"} -1.5e3\n# HELP h h\n# TYPE h histogram\n"
        . "h_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\n"
        . "h_count 2\n");
    ok(!@$err, 'parser accepts a valid page') or diag join "\n", @$err;
}

###########################################################################
# scraping

my $SCRAPES = 0;    # scrapes counted so far (each in its log phase)

sub scrape {
    my ($name) = @_;
    my $r = $t->request('/metrics');
    $SCRAPES++;
    unless ($r->status == 200) {
        fail("$name: metrics 200");
        return { values => {} };
    }
    my ($m, $err) = prom_parse($r->body);
    ok(!@$err, "$name: strict text format")
        or diag join "\n", grep { defined } @$err[0 .. 19];
    return $m;
}

sub v {
    my ($m, $name, @l) = @_;
    return $m->{values}{ label_key($name, @l) };
}

sub req_key {
    my ($channel, $service, $status) = @_;
    return label_key('civicgate_requests_total', channel => $channel,
        service => $service, status => $status);
}

# every series moves by what %$want says, every other one stays, except
# those $skip matches
sub check_moved {
    my ($name, $before, $after, $want, $skip) = @_;
    my @bad;
    for my $k (sort keys %{ $after->{values} }) {
        next if $skip && $k =~ $skip;
        my $d = $after->{values}{$k} - ($before->{values}{$k} // 0);
        my $w = $want->{$k} // 0;
        push @bad, "$k moved $d, expected $w" if abs($d - $w) > 1e-9;
    }
    for my $k (sort keys %$want) {
        push @bad, "$k missing" unless exists $after->{values}{$k};
    }
    ok(!@bad, "$name: every series moved exactly as expected")
        or diag join "\n", @bad;
}

sub cmdstat {
    my ($cmd) = @_;
    my $info = $t->redis_query('INFO', 'commandstats') // '';
    return $info =~ /^cmdstat_\Q$cmd\E:calls=(\d+)/m ? $1 : 0;
}

sub gauges {
    my ($m) = @_;
    return join '/', map {
        v($m, 'civicgate_redis_connections', role => $_) // 'undef'
    } qw(command subscriber);
}

sub wait_gauges {
    my ($want, $name) = @_;
    my $last;
    my $ok = $t->wait_until(sub {
        my $r = $t->request('/metrics');
        $SCRAPES++;
        my ($m) = prom_parse($r->body // '');
        $last = gauges($m);
        return $last eq $want;
    }, timeout => 15, interval => 0.1);
    ok($ok, "$name: redis connections command/subscriber = $want")
        or diag "last seen $last";
}

###########################################################################
# the page as served

{
    my $r = $t->request('/metrics');
    $SCRAPES++;
    is($r->status, 200, 'metrics: 200');
    is($r->header('Content-Type'), 'text/plain; version=0.0.4; charset=utf-8',
        'metrics: content type of the 0.0.4 format');
    my ($m, $err) = prom_parse($r->body);
    ok(!@$err, 'first scrape: strict text format') or diag join "\n", @$err;

    my %want_types = (
        civicgate_journeys_total => 'counter',
        civicgate_requests_total => 'counter',
        civicgate_request_duration_seconds => 'histogram',
        civicgate_events_total => 'counter',
        civicgate_limit_requests_total => 'counter',
        civicgate_limit_fallbacks_total => 'counter',
        civicgate_consent_checks_total => 'counter',
        civicgate_consent_changes_total => 'counter',
        civicgate_consent_cache_total => 'counter',
        civicgate_redis_commands_total => 'counter',
        civicgate_redis_errors_total => 'counter',
        civicgate_redis_reconnects_total => 'counter',
        civicgate_redis_command_duration_seconds => 'histogram',
        civicgate_redis_connections => 'gauge',
        civicgate_maintenance => 'gauge',
    );
    is_deeply({ map { $_ => $m->{types}{$_} } keys %want_types },
        \%want_types, 'every family with its type');

    # channel x service x class, all present from the start, at zero
    my @missing;
    for my $c (qw(web app sms unknown)) {
        for my $s (qw(tax permits health consents scrape none)) {
            for my $k (qw(1xx 2xx 3xx 4xx 5xx)) {
                my $v = $m->{values}{ req_key($c, $s, $k) };
                push @missing, req_key($c, $s, $k) . '=' . ($v // 'undef')
                    unless defined $v && $v == 0;
            }
        }
    }
    ok(!@missing, 'requests_total: 4 channels x 6 services x 5 classes at 0')
        or diag join "\n", @missing;
    is(scalar(grep { /^civicgate_requests_total/ } keys %{ $m->{values} }),
        4 * 6 * 5, 'requests_total: no other series');

    is(scalar(grep { /^civicgate_request_duration_seconds_bucket\{service="tax"/ }
        keys %{ $m->{values} }), 12, 'request duration: 11 buckets and +Inf');
    is(scalar(grep { /^civicgate_redis_command_duration_seconds_bucket/ }
        keys %{ $m->{values} }), 12, 'redis duration: 11 buckets and +Inf');
    like($r->body, qr/^civicgate_redis_command_duration_seconds_bucket\{le="0.0001"\} \d+$/m,
        'redis duration: sub-millisecond buckets');
    is(v($m, 'civicgate_maintenance'), 0, 'maintenance gauge 0');
    for my $kind (qw(timeout connection reply)) {
        is(v($m, 'civicgate_redis_errors_total', kind => $kind), 0,
            "redis errors{kind=$kind} present, 0");
    }
}

wait_gauges('2/2', 'two workers');

###########################################################################
# traffic whose every count is known

my $S0 = scrape('before traffic');
my $sc0 = $SCRAPES - 1;             # the scrapes counted in $S0
my ($ev0, $xa0) = (cmdstat('evalsha'), cmdstat('xadd'));

my (%want, %pids, @ids);
my $add = sub { $want{ $_[0] } += $_[1] // 1 };

for my $i (1 .. 60) {
    my $ch = $i % 5 == 0 ? 'bogus' : $i % 3 == 0 ? 'app' : 'web';
    my $r = $t->request('/tax/', headers => [ 'X-Channel' => $ch ]);
    $pids{ ($r->body // '') =~ /^(\d+)/ ? $1 : '' }++ if $r->status == 200;
    push @ids, $r->header('X-Journey-ID');
    $add->(req_key($ch eq 'bogus' ? 'unknown' : $ch, 'tax', '2xx'));
}
is(scalar keys %pids, 2, 'both workers served /tax/') or diag explain \%pids;

for my $i (0 .. 9) {
    my $r = $t->request('/tax/', headers => [ 'X-Channel' => 'web',
        'X-Journey-ID' => $ids[$i] ]);
    is($r->header('X-Journey-ID'), $ids[$i], "journey $i reused") if $i < 1;
    $add->(req_key('web', 'tax', '2xx'));
}
for (1 .. 5) {
    $t->request('/tax/', headers => [ 'X-Channel' => 'web',
        'X-Journey-ID' => mint_journey_id($OTHER) ]);
    $add->(req_key('web', 'tax', '2xx'));
}
for (1 .. 20) {
    $t->request('/permits/', headers => [ 'X-Channel' => 'sms' ]);
    $add->(req_key('sms', 'permits', '4xx'));
}
for (1 .. 10) {
    $t->request('/broken', headers => [ 'X-Channel' => 'web' ]);
    $add->(req_key('web', 'permits', '5xx'));
}
for (1 .. 10) {
    $t->request('/moved', headers => [ 'X-Channel' => 'app' ]);
    $add->(req_key('app', 'tax', '3xx'));
}
for (1 .. 10) {
    $t->request('/plain');
    $add->(req_key('unknown', 'none', '2xx'));
}
my %lim;
for my $k (1 .. 5) {
    for (1 .. 3) {
        my $r = $t->request('/lim', headers => [ 'X-Key' => "key-$k",
            'X-Channel' => 'web' ]);
        $lim{ $r->status }++;
        $add->(req_key('web', 'tax', $r->status == 200 ? '2xx' : '4xx'));
    }
}
is_deeply(\%lim, { 200 => 5, 429 => 10 }, 'limits: 5 passed, 10 rejected');

# every event written before comparing (the scrapes while waiting count)
my $events = 75;
ok($t->wait_until(sub {
    my $r = $t->request('/metrics');
    $SCRAPES++;
    my ($m) = prom_parse($r->body // '');
    my $w = v($m, 'civicgate_events_total', result => 'written') // -1;
    return $w >= $events;
}, timeout => 10), "$events events written");

my $S1 = scrape('after traffic');
my $scrapes = ($SCRAPES - 1) - $sc0;

$add->(req_key('unknown', 'scrape', '2xx'), $scrapes);
$add->(label_key('civicgate_journeys_total', result => 'minted'), 65);
$add->(label_key('civicgate_journeys_total', result => 'reused'), 10);
$add->(label_key('civicgate_journeys_total', result => 'forged'), 5);
$add->(label_key('civicgate_events_total', result => 'written'), $events);
$add->(label_key('civicgate_limit_requests_total', zone => 'lz',
    result => 'passed'), 5);
$add->(label_key('civicgate_limit_requests_total', zone => 'lz',
    result => 'rejected'), 10);

my %per_service = (tax => 60 + 10 + 5 + 10 + 15, permits => 30, none => 10,
    scrape => $scrapes);
for my $s (keys %per_service) {
    $add->(label_key('civicgate_request_duration_seconds_count',
        service => $s), $per_service{$s});
}
# Redis: one script call per batch of events, each answered and timed;
# as many as Redis ran
my $calls = cmdstat('evalsha') - $ev0;
cmp_ok($calls, '>=', 1, "Redis ran $calls EVALSHA for the $events events");
cmp_ok($calls, '<', $events, 'fewer script calls than events (batches)');
$add->('civicgate_redis_commands_total', $calls);
$add->('civicgate_redis_command_duration_seconds_count', $calls);

check_moved('traffic', $S0, $S1, \%want,
    qr/_bucket|_sum\b|_sum\{|^civicgate_redis_connections/);

# the batch script's XADD counts in Redis's statistics too
is(cmdstat('xadd') - $xa0, $events, 'Redis ran one XADD per event');
is(v($S1, 'civicgate_request_duration_seconds_bucket', service => 'tax',
    le => '+Inf') - v($S0, 'civicgate_request_duration_seconds_bucket',
    service => 'tax', le => '+Inf'), $per_service{tax},
    'request duration: +Inf bucket of tax moved by its requests');
cmp_ok(v($S1, 'civicgate_request_duration_seconds_bucket', service => 'tax',
    le => '10') - v($S0, 'civicgate_request_duration_seconds_bucket',
    service => 'tax', le => '10'), '==', $per_service{tax},
    'request duration: all tax requests under 10 s');
cmp_ok(v($S1, 'civicgate_redis_command_duration_seconds_sum')
    - v($S0, 'civicgate_redis_command_duration_seconds_sum'), '>', 0,
    'redis duration: the sum grew');

###########################################################################
# consent checks and changes

{
    my $m0 = scrape('before consent');
    my %w;
    my ($c1, $c2) = ('3171000000000001', '3171000000000002');

    my $put = $t->request('/consents/health', method => 'PUT', body => '',
        headers => [ 'X-Citizen-Id' => $c1 ]);
    is($put->status, 201, 'consent granted through the API');
    $w{ label_key('civicgate_consent_changes_total', purpose => 'health',
        change => 'granted') }++;

    for (1 .. 3) {
        is($t->request('/c', headers => [ 'X-Citizen-Id' => $c1 ])->status,
            200, 'granted citizen passes');
    }
    for (1 .. 2) {
        is($t->request('/c', headers => [ 'X-Citizen-Id' => $c2 ])->status,
            403, 'citizen without consent refused');
    }
    my $del = $t->request('/consents/health', method => 'DELETE',
        headers => [ 'X-Citizen-Id' => $c1 ]);
    is($del->status, 200, 'consent withdrawn through the API');
    $w{ label_key('civicgate_consent_changes_total', purpose => 'health',
        change => 'withdrawn') }++;

    ok($t->wait_until(sub {
        $t->request('/c', headers => [ 'X-Citizen-Id' => $c1 ])->status == 403
    }, timeout => 5), 'withdrawn citizen refused');

    my $m1 = scrape('after consent');

    # the withdrawal evicted the cached grant at once: refused right away
    my ($granted, $denied) = (3, 3);
    $w{ label_key('civicgate_consent_checks_total', purpose => 'health',
        result => 'granted') } = $granted;
    $w{ label_key('civicgate_consent_checks_total', purpose => 'health',
        result => 'denied') } = $denied;

    # one cache lookup per check; the first look at each citizen misses,
    # and the first after the withdrawal (which evicted the grant); the
    # refusal of c2 is cached for negative_ttl (1 s) only, so its second
    # look hits only on a quick enough machine
    my $moved = sub {
        v($m1, 'civicgate_consent_cache_total', result => $_[0])
            - v($m0, 'civicgate_consent_cache_total', result => $_[0]) };
    is($moved->('hit') + $moved->('miss'), 6, 'consent cache: six lookups');
    ok($moved->('miss') >= 3 && $moved->('hit') >= 2,
        'consent cache: the three first looks miss, c1\'s others hit ('
        . $moved->('hit') . ' hits, ' . $moved->('miss') . ' misses)');

    # exactly the checks made: 200s are grants, 403s denials
    my $r200 = v($m1, 'civicgate_requests_total', channel => 'unknown',
        service => 'health', status => '2xx') - v($m0,
        'civicgate_requests_total', channel => 'unknown', service => 'health',
        status => '2xx');
    my $r403 = v($m1, 'civicgate_requests_total', channel => 'unknown',
        service => 'health', status => '4xx') - v($m0,
        'civicgate_requests_total', channel => 'unknown', service => 'health',
        status => '4xx');
    is($r200, $granted, 'consent: one grant counted per 200');
    is($r403, $denied, 'consent: one denial counted per 403');
    is(v($m1, 'civicgate_requests_total', channel => 'unknown',
        service => 'consents', status => '2xx')
        - v($m0, 'civicgate_requests_total', channel => 'unknown',
        service => 'consents', status => '2xx'), 2, 'consent API: two 2xx');

    check_moved('consent', $m0, $m1, \%w,
        qr/^civicgate_(?:requests_total|request_duration|redis_|consent_cache_total)/);
}

###########################################################################
# a reload keeps the counters

{
    my $before = scrape('before reload');
    ok($t->reload, 'reload');
    wait_gauges('2/2', 'after reload, old workers gone');
    my $after = scrape('after reload');

    # only the scrapes moved: every request-driven counter kept its value
    my %w;
    my $n = v($after, 'civicgate_requests_total', channel => 'unknown',
        service => 'scrape', status => '2xx') - v($before,
        'civicgate_requests_total', channel => 'unknown', service => 'scrape',
        status => '2xx');
    cmp_ok($n, '>=', 1, 'scrapes went on being counted');
    $w{ req_key('unknown', 'scrape', '2xx') } = $n;
    $w{ label_key('civicgate_request_duration_seconds_count',
        service => 'scrape') } = $n;
    check_moved('reload', $before, $after, \%w,
        qr/_bucket|_sum|^civicgate_redis_/);
    cmp_ok(v($after, 'civicgate_events_total', result => 'written'), '>=',
        $events, 'events written kept');
    cmp_ok(v($after, 'civicgate_redis_commands_total'), '>',
        v($before, 'civicgate_redis_commands_total'),
        'redis commands kept, and the new connections\' setup added');

    my $m0 = $after;
    for (1 .. 20) {
        $t->request('/tax/', headers => [ 'X-Channel' => 'sms' ]);
    }
    my $m1 = scrape('after reload and traffic');
    is(v($m1, 'civicgate_requests_total', channel => 'sms', service => 'tax',
        status => '2xx') - v($m0, 'civicgate_requests_total', channel => 'sms',
        service => 'tax', status => '2xx'), 20,
        'new workers add to the kept counters');
}

###########################################################################
# a killed worker leaves no gauge behind

{
    $t->allow_log(qr/exited on signal 9/);
    my @w = $t->worker_pids;
    kill 'KILL', $w[0];
    ok($t->wait_until(sub {
        my @n = $t->worker_pids;
        @n == 2 && !grep { $_ == $w[0] } @n;
    }, timeout => 10), 'the master replaced the killed worker');
    my @now = $t->worker_pids;
    my ($new) = grep { my $p = $_; !grep { $_ == $p } @w } @now;
    ok($t->wait_until(sub {
        my @c = grep { ($_->{name} // '') eq "civicgate-$new" }
            $t->redis_clients;
        @c == 2;
    }, timeout => 10), 'the new worker connected (command and subscriber)');
    wait_gauges('2/2', 'after the kill: the dead worker\'s connections left');
    my $m = scrape('after kill');
    is(gauges($m), '2/2', 'still 2/2');
}

###########################################################################
# Redis errors by kind

{
    my $m0 = scrape('before error reply');
    $t->redis_query('SCRIPT', 'FLUSH');
    $t->request('/tax/', headers => [ 'X-Channel' => 'web' ]);
    my $m1;
    ok($t->wait_until(sub {
        $m1 = scrape('waiting for the NOSCRIPT');
        v($m1, 'civicgate_redis_errors_total', kind => 'reply')
            > v($m0, 'civicgate_redis_errors_total', kind => 'reply');
    }, timeout => 5), 'an error reply is counted');
    is(v($m1, 'civicgate_redis_errors_total', kind => 'reply')
        - v($m0, 'civicgate_redis_errors_total', kind => 'reply'), 1,
        'one NOSCRIPT, one reply error');
    # the NOSCRIPT is answered by a SCRIPT LOAD and the command sent again
    is(v($m1, 'civicgate_events_total', result => 'failed')
        - v($m0, 'civicgate_events_total', result => 'failed'), 0,
        'the event did not fail: sent again after SCRIPT LOAD');
    is(v($m1, 'civicgate_redis_errors_total', kind => 'connection')
        - v($m0, 'civicgate_redis_errors_total', kind => 'connection'), 0,
        'the connection stayed');
}

{
    my $m0 = scrape('before timeout');
    $t->redis_query('CLIENT', 'PAUSE', 800, 'ALL');
    $t->request('/tax/', headers => [ 'X-Channel' => 'web' ]);
    my $m1;
    ok($t->wait_until(sub {
        $m1 = scrape('waiting for the timeout');
        v($m1, 'civicgate_redis_errors_total', kind => 'timeout')
            > v($m0, 'civicgate_redis_errors_total', kind => 'timeout');
    }, timeout => 5), 'a command timed out while Redis was paused');
    ok($t->wait_until(sub {
        $m1 = scrape('waiting for the reconnect');
        v($m1, 'civicgate_redis_reconnects_total')
            > v($m0, 'civicgate_redis_reconnects_total');
    }, timeout => 5), 'a reconnect followed');
    wait_gauges('2/2', 'after the timeout');
}

{
    my $m0 = scrape('before Redis stops');
    $t->stop_redis;
    wait_gauges('0/0', 'Redis stopped');

    # a purpose that cannot be decided is counted as such
    my $r = $t->request('/c', headers => [ 'X-Citizen-Id' => '3171000000000009' ]);
    is($r->status, 503, 'consent cannot be checked: 503');
    my $m1 = scrape('Redis down');
    is(v($m1, 'civicgate_consent_checks_total', purpose => 'health',
        result => 'unavailable') - v($m0, 'civicgate_consent_checks_total',
        purpose => 'health', result => 'unavailable'), 1,
        'consent checks: one unavailable');
    cmp_ok(v($m1, 'civicgate_redis_errors_total', kind => 'connection')
        - v($m0, 'civicgate_redis_errors_total', kind => 'connection'), '>=',
        4, 'the four connections failed');

    $t->run_redis;
    wait_gauges('2/2', 'Redis back');
    my $m2 = scrape('Redis back');
    cmp_ok(v($m2, 'civicgate_redis_reconnects_total')
        - v($m0, 'civicgate_redis_reconnects_total'), '>=', 4,
        'reconnects counted');
}

###########################################################################
# a reload that changes the series starts from zero

{
    write_conf("location /extra/ { civicgate_service extra; return 200; }");
    ok($t->reload, 'reload with a new service');
    wait_gauges('2/2', 'new layout: gauges of the new workers only');
    my $m = scrape('new layout');
    ok(defined v($m, 'civicgate_requests_total', channel => 'web',
        service => 'extra', status => '2xx'), 'the new service has its series');
    my @nonzero = grep {
        /^civicgate_(?:journeys|requests|events|limit_requests|consent)/
            && $m->{values}{$_} != 0
            && $_ ne req_key('unknown', 'scrape', '2xx')
    } keys %{ $m->{values} };
    ok(!@nonzero, 'request counters start from zero')
        or diag join "\n", @nonzero;
    cmp_ok(v($m, 'civicgate_requests_total', channel => 'unknown',
        service => 'scrape', status => '2xx'), '>=', 1,
        'scrapes of the new workers counted');
}

$t->done_testing;
