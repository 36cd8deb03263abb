#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The consent cache is keyed by the purpose's name: a reload that reorders
# civicgate_consent_purposes keeps every cached decision with its purpose.
# Redis is stopped before the reload, so that the new workers' decisions
# come from the shared-memory cache alone (no resubscription flushes it).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

my $CONF = <<'EOF';
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=200ms;

    civicgate_consent_purposes {
%%PURPOSES%%
    }
    civicgate_consent_cache zone=consent:1m ttl=60s negative_ttl=60s;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;
        add_header X-Consent-Status $civicgate_consent_status always;

        location /health/ {
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /tax/ {
            civicgate_consent tax;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /consents/ {
            civicgate_consent_api;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name backend;
        location / {
            return 200 "backend reached\n";
        }
    }
EOF

sub write_conf {
    my (@purposes) = @_;
    my %label = (health => '"Kesehatan" "Health"', tax => '"Pajak" "Tax"');
    my $list = join "\n", map { "        $_ $label{$_};" } @purposes;
    (my $conf = $CONF) =~ s/%%PURPOSES%%/$list/;
    $t->write_nginx_conf($conf);
}

write_conf(qw(health tax));
$t->run_redis;
$t->run;

my $CIT = 'CIT-' . unpack('H*', random_bytes(4));

sub req {
    my ($path) = @_;
    return $t->request($path, headers => [ 'X-Citizen-Id' => $CIT ]);
}

my $FLUSHED = qr/consent cache flushed on \(re\)subscription/;

# the worker's subscription flushes the cache when it is made: before the
# decisions are cached, not between them
ok($t->wait_for_log($FLUSHED, timeout => 5),
    'subscribed: the flush of the subscription is done');

my $r = $t->request('/consents/health', method => 'PUT',
    headers => [ 'X-Citizen-Id' => $CIT ]);
is($r->status, 201, 'health granted') or diag $r->raw;

# decisions cached: health granted, tax refused.  A resubscription (a PING
# unanswered within timeout= on a loaded machine) flushes them: then they
# are cached again, a bounded number of times.
my ($health, $tax, $flushed);
for (1 .. 5) {
    my $mark = $t->log_mark;
    $health = req('/health/a')->status;
    $tax = req('/tax/a')->status;
    $flushed = $t->log_since($mark) =~ $FLUSHED;
    last unless $flushed;
}
is($health, 200, 'before reload: health 200');
is($tax, 403, 'before reload: tax 403');
ok(!$flushed, 'no resubscription flushed the cached decisions');

$t->stop_redis;

write_conf(qw(tax health));
ok($t->reload, 'reload with the purposes reordered');

$r = req('/health/a');
is($r->status, 200, 'after reload, from the cache: health still 200')
    or diag $r->raw;
is($r->header('X-Consent-Status'), 'GRANTED', 'health: GRANTED');

$r = req('/tax/a');
is($r->status, 403, 'after reload, from the cache: tax still 403')
    or diag $r->raw;
like($r->body // '', qr/"purpose":"tax"/, 'tax: the purpose refused is tax');

$t->done_testing;
