#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The Grafana dashboard of examples/grafana: the JSON parses and has what
# Grafana needs to import it (schemaVersion 36 or later, a "datasource"
# variable that every panel and query uses, panels with unique ids and
# non-overlapping gridPos on the 24-column grid, targets with an expr and
# a refId); its queries are valid PromQL (promtool checks each, Grafana's
# variables replaced, as a recording rule); it shows every family the
# operations guide lists; and every metric name and label value in every
# query (and variable) is in the /metrics output of a real gateway with
# every feature configured, or, for a mode that gateway does not run,
# listed in docs/metrics.md.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use Civicgate::Test qw(:all);
use Civicgate::Metrics;

my $t = Civicgate::Test->new;

my $FILE = "$FindBin::Bin/../examples/grafana/civicgate-dashboard.json";
my $PROMTOOL = $ENV{CIVICGATE_PROMTOOL} // '/usr/bin/promtool';

my $d = eval {
    open my $fh, '<', $FILE or die "$FILE: $!";
    local $/;
    JSON::PP->new->decode(scalar <$fh>);
};
ok(ref $d eq 'HASH', 'the dashboard is a JSON object') or diag $@;
$d //= {};

###########################################################################
# what an import needs

cmp_ok($d->{schemaVersion} // 0, '>=', 36, 'schemaVersion 36 or later');
like($d->{title} // '', qr/\S/, 'a title');
like($d->{uid} // '', qr/^[\w-]{1,40}$/, 'a uid');
ok(!exists $d->{id} || !defined $d->{id}, 'no instance id (import makes one)');

my @vars = @{ $d->{templating}{list} // [] };
my ($ds) = grep { ($_->{name} // '') eq 'datasource' } @vars;
ok($ds && $ds->{type} eq 'datasource' && $ds->{query} eq 'prometheus',
    'a "datasource" variable of type datasource, for Prometheus');

my $DSREF = qr/^\$\{datasource\}$/;
for my $v (grep { $_->{type} eq 'query' } @vars) {
    like($v->{datasource}{uid} // '', $DSREF,
        "variable $v->{name} queries \${datasource}");
}

my (%ids, @cells, @exprs);
my @panels = @{ $d->{panels} // [] };
cmp_ok(scalar(@panels), '>=', 20, scalar(@panels) . ' panels');

for my $p (@panels) {
    my $name = ($p->{title} // '?') . " (id " . ($p->{id} // '?') . ')';
    ok(defined $p->{id} && $p->{id} =~ /^\d+$/ && !$ids{ $p->{id} }++,
        "$name: a unique numeric id");
    my $g = $p->{gridPos} // {};
    ok((grep { defined $g->{$_} && $g->{$_} =~ /^\d+$/ } qw(h w x y)) == 4
        && $g->{w} >= 1 && $g->{h} >= 1 && $g->{x} + $g->{w} <= 24,
        "$name: gridPos h, w, x, y within 24 columns");
    like($p->{type} // '', qr/^(row|timeseries|stat|gauge|table)$/,
        "$name: a known type");

    # no two panels on the same grid cell
    my @overlap;
    for my $r ($g->{y} // 0 .. ($g->{y} // 0) + ($g->{h} // 1) - 1) {
        for my $c ($g->{x} // 0 .. ($g->{x} // 0) + ($g->{w} // 1) - 1) {
            push @overlap, "$r,$c" if $cells[$r][$c]++;
        }
    }
    is(scalar(@overlap), 0, "$name: overlaps no other panel");

    next if ($p->{type} // '') eq 'row';

    like($p->{datasource}{uid} // '', $DSREF, "$name: uses \${datasource}");
    my @targets = @{ $p->{targets} // [] };
    ok(@targets >= 1, "$name: targets");
    my %ref;
    for my $tg (@targets) {
        ok(($tg->{expr} // '') =~ /\S/ && ($tg->{refId} // '') =~ /\S/
            && !$ref{ $tg->{refId} }++, "$name: target $tg->{refId}: expr,"
            . ' unique refId');
        like($tg->{datasource}{uid} // '', $DSREF,
            "$name: target $tg->{refId} uses \${datasource}");
        push @exprs, [ "$name $tg->{refId}", $tg->{expr} // '' ];
    }
}

###########################################################################
# the queries are PromQL: each as a recording rule, through promtool

# a missing promtool fails here, and the rest still runs
if (ok(-x $PROMTOOL,
    'promtool is installed (the prometheus package, scripts/deps.sh test)'))
{
    my $yaml = "groups:\n  - name: dashboard\n    rules:\n";
    my $i = 0;
    for my $e (@exprs) {
        (my $q = $e->[1]) =~ s/\$__rate_interval/1m/g;
        $q =~ s/\$__range/1h/g;
        $q =~ s/\$\w+/.*/g;
        $q =~ s/^/          /mg;
        $yaml .= "      - record: dashboard:query_" . $i++ . "\n"
            . "        expr: |\n$q\n";
    }
    my $path = $t->write_file('dashboard-queries.yml', $yaml);
    my $out = `'$PROMTOOL' check rules '$path' 2>&1`;
    is($?, 0, 'promtool: every query of the dashboard parses') or diag $out;
    like($out, qr/SUCCESS: $i rules found/, "promtool: $i queries");
}

###########################################################################
# what the operations guide says the dashboard shows

my $all = join "\n", map { $_->[1] } @exprs;
for my $family (qw(civicgate_requests_total
    civicgate_request_duration_seconds_bucket civicgate_journeys_total
    civicgate_events_total civicgate_event_spool_events
    civicgate_event_spool_capacity civicgate_limit_requests_total
    civicgate_limit_fallbacks_total civicgate_consent_checks_total
    civicgate_consent_cache_total
    civicgate_consent_changes_total civicgate_redis_commands_total
    civicgate_redis_errors_total civicgate_redis_command_duration_seconds_bucket
    civicgate_redis_connections civicgate_redis_reconnects_total
    civicgate_redis_failovers_total civicgate_status_clients
    civicgate_maintenance))
{
    like($all, qr/\b\Q$family\E\b/, "a panel shows $family");
}

###########################################################################
# every name and label value, against a real gateway

my $series = full_gateway($t);
my $docs = documented_metrics();

for my $e (@exprs) {
    check_expr($series, $docs, $e->[1], $e->[0]);
}
for my $v (grep { $_->{type} eq 'query' } @vars) {
    check_expr($series, $docs, $v->{definition} // '', "variable $v->{name}");
}

$t->done_testing;
