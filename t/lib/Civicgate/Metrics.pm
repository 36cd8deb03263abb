package Civicgate::Metrics;

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

=head1 NAME

Civicgate::Metrics - the metric names a gateway really exports, for the
tests of the alert rules and the dashboard in examples/

=head1 SYNOPSIS

    my $t = Civicgate::Test->new;
    my $series = full_gateway($t);     # runs Redis and nginx, scrapes
    my $docs = documented_metrics();   # names of docs/metrics.md's table
    check_expr($series, $docs, $expr, 'where');   # tests, one per name

=head1 DESCRIPTION

C<full_gateway> starts a real redis-server and nginx with every feature
of the module configured (channels, journeys, citizens, events, local and
Redis rate limits, consent with a cache, the consent API, the status
endpoint, the admin endpoint, the health check, metrics), sends a few
requests through each, and returns the series of C</metrics>:
C<{ name =E<gt> [ { label =E<gt> value, ... }, ... ] }>.

C<check_expr> finds every C<civicgate_*> name in a PromQL expression and
checks that the gateway exports it, or, failing that, that
F<docs/metrics.md> lists it in its series table (names documented for a
mode this gateway does not run); for each C<label="value"> matcher on an
exported name, that a series has that label and value.  Matchers whose
value holds a Grafana variable (C<$...>) are not checked.

=cut

use strict;
use warnings;

use Exporter 'import';
use FindBin;
use Test::More;
use Civicgate::Test qw(:all);

our @EXPORT = qw(full_gateway scraped_series documented_metrics
    expr_names expr_matchers check_expr);

my $TOP = "$FindBin::Bin/..";

sub full_gateway {
    my ($t) = @_;

    $t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);
    $t->write_file('ok.txt', "ok\n");
    $t->write_nginx_conf(<<'EOF', worker_processes => 2);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=1s;
    civicgate_channels web app sms;
    civicgate_citizen $http_x_citizen_id;
    civicgate_event_buffer 32k;

    civicgate_limit_zone $civicgate_citizen zone=citizen:1m rate=100r/s
                         store=redis on_error=local;
    civicgate_limit_zone $binary_remote_addr zone=address:1m rate=1000r/s
                         store=local;

    civicgate_consent_purposes {
        health_records "Rekam medis" "Health records";
    }
    civicgate_consent_cache zone=consent:1m ttl=5s;

    server {
        listen 127.0.0.1:%%PORT_0%% reuseport;
        server_name localhost;
        civicgate_channel $http_x_channel;
        civicgate_journey on;

        location /tax/ {
            civicgate_service tax;
            civicgate_limit zone=citizen burst=50 nodelay;
            civicgate_limit zone=address burst=50 nodelay;
            return 200 "tax\n";
        }
        location /forms/ {
            civicgate_service forms;
            return 200 "forms\n";
        }
        location /health/ {
            civicgate_service health;
            civicgate_consent health_records;
            alias %%TESTDIR%%/ok.txt;
        }
        location /consents/ {
            civicgate_consent_api;
        }
        location /status/ {
            civicgate_status;
        }
        location /civicgate/admin/ {
            civicgate_admin;
        }
        location = /healthz {
            civicgate_events off;
            civicgate_health;
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF
    $t->run_redis;
    $t->run;

    my @h = ('X-Channel' => 'web', 'X-Citizen-Id' => 'NIK-3171');
    $t->request('/tax/a', headers => [ @h ]) for 1 .. 3;
    $t->request('/health/a', headers => [ @h ]);
    $t->request('/status/');
    $t->request('/healthz');

    return scraped_series($t);
}

# { name => [ { label => value } ] } of every sample line of /metrics
sub scraped_series {
    my ($t) = @_;
    my $r = $t->request('/metrics');
    is($r->status, 200, 'GET /metrics: 200') or return {};
    my %s;
    for my $l (split /\n/, $r->body) {
        next if $l =~ /^#/ || $l !~ /\S/;
        my ($name, $labels) = $l =~ /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s/
            or next;
        my %l;
        $labels //= '';
        $l{$1} = $2 while $labels =~ /(\w+)="((?:[^"\\]|\\.)*)"/g;
        push @{ $s{$name} }, \%l;
    }
    return \%s;
}

# the names of the series table of docs/metrics.md
sub documented_metrics {
    open my $fh, '<', "$TOP/docs/metrics.md" or die "docs/metrics.md: $!";
    my %n;
    while (<$fh>) {
        $n{$1} = 1 if /^\| \[(civicgate_\w+)\]\(#\1\) \|/;
    }
    return \%n;
}

# PromQL without its strings, comments and Grafana variables' braces
sub _code {
    my ($expr) = @_;
    (my $c = $expr) =~ s/#[^\n]*//g;
    $c =~ s/"(?:[^"\\]|\\.)*"/""/g;
    return $c;
}

sub expr_names {
    my ($expr) = @_;
    my $code = _code($expr);
    my %n;
    $n{$1} = 1 while $code =~ /\b(civicgate_[a-z0-9_]+)\b/g;
    return sort keys %n;
}

# [ name, label, value ] of each label="value" matcher of a civicgate name
sub expr_matchers {
    my ($expr) = @_;
    my @m;
    while ($expr =~ /\b(civicgate_[a-z0-9_]+)\s*\{([^}]*)\}/g) {
        my ($name, $sel) = ($1, $2);
        while ($sel =~ /(\w+)\s*=\s*"((?:[^"\\]|\\.)*)"/g) {
            push @m, [ $name, $1, $2 ];
        }
    }
    return @m;
}

sub check_expr {
    my ($series, $docs, $expr, $where) = @_;

    for my $name (expr_names($expr)) {
        my $ok = exists $series->{$name} || $docs->{$name};
        ok($ok, "$where: $name "
            . (exists $series->{$name} ? 'is exported'
                : 'is not exported, but listed in docs/metrics.md'));
    }

    for my $m (expr_matchers($expr)) {
        my ($name, $label, $value) = @$m;
        next if $value =~ /\$/ || !exists $series->{$name};
        ok((grep { ($_->{$label} // "\0") eq $value } @{ $series->{$name} }),
            "$where: $name has a series with $label=\"$value\"");
    }
}

1;
