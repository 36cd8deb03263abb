#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The Prometheus alert rules of examples/prometheus: promtool accepts them
# ("check rules") and their unit tests pass ("test rules"), in which every
# alert fires on a synthetic fault and stays quiet on a healthy gateway;
# every alert has a "for:", a severity, a summary, a description and a
# runbook link to a section of docs/operations.md; every metric name and
# label value the rules use is in the /metrics output of a real gateway
# with every feature configured (or, for a mode that gateway does not run,
# in docs/metrics.md).  Then the spool gauges the spool alerts read: they
# count the events waiting while Redis is down, and fall back to zero
# once Redis has them all.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);
use Civicgate::Metrics;

my $t = Civicgate::Test->new;

my $DIR = "$FindBin::Bin/../examples/prometheus";
my $RULES = 'civicgate-alerts.yml';
my $TESTS = 'civicgate-alerts.test.yml';
my $PROMTOOL = $ENV{CIVICGATE_PROMTOOL} // '/usr/bin/promtool';

sub slurp {
    my ($path) = @_;
    open my $fh, '<', $path or die "$path: $!";
    local $/;
    return scalar <$fh>;
}

###########################################################################
# promtool

# a missing promtool fails here, and the rest still runs
my $have_promtool = ok(-x $PROMTOOL,
    'promtool is installed (the prometheus package, scripts/deps.sh test)');

my $rules = slurp("$DIR/$RULES");
my @alerts = $rules =~ /^\s+- alert: (\w+)$/mg;
cmp_ok(scalar(@alerts), '>=', 12, scalar(@alerts) . ' alerts in the file');

if ($have_promtool) {
    my $out = `cd '$DIR' && '$PROMTOOL' check rules $RULES 2>&1`;
    is($?, 0, 'promtool check rules: exit 0') or diag $out;
    like($out, qr/SUCCESS: ${\ scalar @alerts} rules found/,
        'promtool check rules: every alert found');
}

if ($have_promtool) {
    my $out = `cd '$DIR' && '$PROMTOOL' test rules $TESTS 2>&1`;
    is($?, 0, 'promtool test rules: exit 0') or diag $out;
    like($out, qr/SUCCESS/, 'promtool test rules: SUCCESS');
}

###########################################################################
# each alert: its parts, its runbook, its unit tests

my %anchors;
{
    my $ops = slurp("$FindBin::Bin/../docs/operations.md");
    for my $h ($ops =~ /^#{2,4} (.+)$/mg) {
        (my $a = lc $h) =~ s/[^\w\- ]//g;
        $a =~ tr/ /-/;
        $anchors{$a} = 1;
    }
}

my $tests = slurp("$DIR/$TESTS");
my %exprs;

for my $block (split /^(?=\s+- alert: )/m, $rules) {
    my ($name) = $block =~ /^\s+- alert: (\w+)$/m or next;
    my ($expr) = $block =~ /^\s+expr: \|\n(.*?)^\s+for:/ms;
    $exprs{$name} = $expr // '';

    like($block, qr/^\s+for: \d+[smh]$/m, "$name: for:");
    like($block, qr/^\s+severity: (critical|warning|info)$/m,
        "$name: severity");
    like($block, qr/^\s+summary: "[^"]+"$/m, "$name: summary");
    like($block, qr/^\s+description: >-\n\s+\S/m, "$name: description");

    my ($anchor) = $block =~ m{^\s+runbook_url: docs/operations\.md#(\S+)$}m;
    ok(defined $anchor && $anchors{$anchor},
        "$name: runbook_url to a section of docs/operations.md ("
        . ($anchor // 'none') . ')');

    # fires in a test, and is expected quiet in one
    my @cases = $tests =~ /^\s+alertname: \Q$name\E\n\s+exp_alerts:(.*?)(?=^\s+- eval_time:|^  - interval:|\z)/msg;
    ok((grep { /exp_labels:/ } @cases), "$name: a unit test where it fires");
    ok((grep { /^ \[\]\s*$/ } @cases), "$name: a unit test where it is quiet");
}

###########################################################################
# the names and labels the rules use, against a real gateway

my $series = full_gateway($t);
my $docs = documented_metrics();

for my $name (sort keys %exprs) {
    check_expr($series, $docs, $exprs{$name}, $name);
}

###########################################################################
# the spool gauges: events waiting while Redis is down, then written

{
    my $m = $t->metrics;
    # 32k: 101 slots (docs/directives.md, civicgate_event_buffer)
    is(metric($m, 'civicgate_event_spool_capacity'), 101,
        'spool capacity: 101 slots for 32k');
    is(metric($m, 'civicgate_event_spool_events'), 0,
        'spool: empty with Redis up');

    my $before = $t->redis_query('XLEN', 'cg:events');
    $t->stop_redis;
    ok($t->wait_until(sub {
        metric($t->metrics, 'civicgate_redis_connections', role => 'command')
            == 0;
    }, timeout => 10), 'Redis stopped: the gateway sees it');

    my @h = (headers => [ 'X-Channel' => 'app', 'X-Citizen-Id' => 'NIK-9' ]);
    my %st;
    $st{ $t->request('/forms/a', @h)->status }++ for 1 .. 40;
    is_deeply(\%st, { 200 => 40 }, '40 requests answered without Redis');

    $m = $t->metrics;
    is(metric($m, 'civicgate_event_spool_events'), 40,
        'spool: the 40 events wait');
    is(metric($m, 'civicgate_events_total', result => 'dropped'), 0,
        'nothing dropped');

    $t->run_redis;
    ok($t->wait_until(sub {
        metric($t->metrics, 'civicgate_event_spool_events') == 0;
    }, timeout => 15), 'Redis back: the spool gauge falls to 0');
    # Redis restarted empty: only the spooled events are in the stream
    is($t->redis_query('XLEN', 'cg:events'), 40,
        'the 40 spooled events are in Redis') or diag "before: $before";
}

$t->done_testing;
