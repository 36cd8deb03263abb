#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Every location that names purposes checks them for the request that
# reaches it, whatever the route: try_files to a named location,
# error_page = @named, X-Accel-Redirect from a backend, rewrite ... last,
# and the subrequests of auth_request, mirror and SSI.  The first location
# asks for "portal", the one reached asks for "health_records": a citizen
# holding only "portal" never reaches the backend behind the second, one
# holding both does.  Backend hits are counted in the backend's own
# access log.  A purpose already granted to the request is not asked of
# Redis again.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);
$t->write_file('html/ssi/page.html',
    "page<!--# include virtual=\"/inc/page\" -->end\n");
$t->write_file('empty/.keep', '');

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    civicgate_consent_purposes {
        health_records "Rekam medis"   "Health records";
        portal         "Portal warga"  "Citizen portal";
    }

    log_format uri '$request_uri';

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;

        location /la/ {
            civicgate_consent portal;
            try_files /nonexistent @svc;
        }
        location @svc {
            civicgate_consent health_records;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }

        location /same/ {
            civicgate_consent portal;
            try_files /nonexistent @portal;
        }
        location @portal {
            civicgate_consent portal;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }

        location /ep/ {
            civicgate_consent portal;
            root %%TESTDIR%%/empty;
            error_page 404 = @svc;
        }

        location /xa/ {
            civicgate_consent portal;
            proxy_pass http://127.0.0.1:%%PORT_1%%/accel/;
        }
        location /protected/ {
            internal;
            civicgate_consent health_records;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }

        location /rw/ {
            civicgate_consent portal;
            rewrite ^/rw/(.*)$ /protected/$1 last;
        }

        location /ar/ {
            civicgate_consent portal;
            auth_request /authz;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location = /authz {
            internal;
            civicgate_consent health_records;
            proxy_pass http://127.0.0.1:%%PORT_1%%/authz;
        }

        location /mr/ {
            civicgate_consent portal;
            mirror /mirror;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location = /mirror {
            internal;
            civicgate_consent health_records;
            proxy_pass http://127.0.0.1:%%PORT_1%%/mirrored$request_uri;
        }

        location /ssi/ {
            civicgate_consent portal;
            ssi on;
            root %%TESTDIR%%/html;
        }
        location /inc/ {
            civicgate_consent health_records;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }

        location /consents/ {
            civicgate_consent_api;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name backend;
        access_log %%TESTDIR%%/backend.log uri;

        location /accel/ {
            add_header X-Accel-Redirect /protected/from-accel;
            return 200 "not this\n";
        }
        location / {
            return 200 "backend reached\n";
        }
    }
EOF

$t->run_redis;
$t->run;

my $n = 0;
sub new_citizen { sprintf 'CIT-%s-%02d', unpack('H*', random_bytes(4)), ++$n }

sub req {
    my ($path, $citizen, %o) = @_;
    return $t->request($path, headers => [ 'X-Citizen-Id' => $citizen ], %o);
}

sub grant {
    my ($citizen, $purpose) = @_;
    my $r = req("/consents/$purpose", $citizen, method => 'PUT');
    is($r->status, 201, "grant $purpose") or diag $r->raw;
}

# how many times the backend was asked for $uri (its own access log)
sub backend_hits {
    my ($uri) = @_;
    my $log = $t->read_file('backend.log') // '';
    return scalar grep { $_ eq $uri } split /\n/, $log;
}

# the gateway logs a request only once its subrequests (mirror) are done
sub logged {
    my ($want) = @_;
    return $t->wait_until(sub {
        my @l = split /\n/, $t->access_log;
        @l >= $want;
    }, timeout => 10);
}

sub checks {
    my ($purpose) = @_;
    my $m = $t->metrics or return -1;
    my $v = 0;
    $v += metric($m, 'civicgate_consent_checks_total',
        purpose => $purpose, result => $_) // 0 for qw(granted denied);
    return $v;
}

my $PORTAL = new_citizen();
grant($PORTAL, 'portal');

my $BOTH = new_citizen();
grant($BOTH, 'portal');
grant($BOTH, 'health_records');

my @routes = (
    [ 'try_files to a named location', '/la/a',  '/la/a' ],
    [ 'error_page = @named',           '/ep/a',  '/ep/a' ],
    [ 'X-Accel-Redirect',              '/xa/a',  '/protected/from-accel' ],
    [ 'rewrite ... last',              '/rw/a',  '/protected/a' ],
    [ 'auth_request subrequest',       '/ar/a',  '/authz' ],
);

for my $route (@routes) {
    my ($name, $path, $hit) = @$route;

    my $before = backend_hits($hit);
    my $r = req($path, $PORTAL);
    is($r->status, 403, "$name, portal only: 403") or diag $r->raw;
    # auth_request answers the subrequest's status with a page of its own
    like($r->body // '', qr/health_records/,
        "$name, portal only: the purpose refused is health_records")
        unless $path =~ m{^/ar/};
    is(backend_hits($hit), $before, "$name, portal only: backend not hit");

    $r = req($path, $BOTH);
    is($r->status, 200, "$name, both granted: 200") or diag $r->raw;
    is(backend_hits($hit), $before + 1, "$name, both granted: backend hit once");
}

# auth_request: the main request reaches its backend only once authorized
is(backend_hits('/ar/a'), 1, 'auth_request: main backend hit only with both');

# mirror: the main request passes on "portal", the mirror needs more
{
    my $lines = () = split /\n/, $t->access_log;

    my $r = req('/mr/a', $PORTAL);
    is($r->status, 200, 'mirror, portal only: main request 200');
    ok(logged($lines + 1), 'mirror, portal only: request done');
    is(backend_hits('/mr/a'), 1, 'mirror, portal only: main backend hit');
    is(backend_hits('/mirrored/mr/a'), 0,
        'mirror, portal only: mirror backend not hit');

    $r = req('/mr/a', $BOTH);
    is($r->status, 200, 'mirror, both granted: main request 200');
    ok(logged($lines + 2), 'mirror, both granted: request done');
    is(backend_hits('/mirrored/mr/a'), 1,
        'mirror, both granted: mirror backend hit');
}

# SSI: the include is a subrequest to a location of its own
{
    my $r = req('/ssi/page.html', $PORTAL);
    is($r->status, 200, 'SSI, portal only: page 200');
    unlike($r->body // '', qr/backend reached/,
        'SSI, portal only: the include did not reach the backend');
    like($r->body // '', qr/^page\{.*"purpose":"health_records".*\}\s*end$/s,
        'SSI, portal only: the include is the problem document');
    is(backend_hits('/inc/page'), 0, 'SSI, portal only: backend not hit');

    $r = req('/ssi/page.html', $BOTH);
    like($r->body // '', qr/^page\s*backend reached\s*end$/,
        'SSI, both granted: the include reached the backend');
    is(backend_hits('/inc/page'), 1, 'SSI, both granted: backend hit once');
}

# no identity: the named location answers 401 too, never the backend
{
    my $r = $t->request('/la/b');
    is($r->status, 401, 'no identity: 401');
    is(backend_hits('/la/b'), 0, 'no identity: backend not hit');
}

# a purpose granted to the request is not checked again after a redirect
{
    my $c = checks('portal');
    my $r = req('/same/a', $PORTAL);
    is($r->status, 200, 'same purpose after try_files: 200');
    is(checks('portal') - $c, 1, 'same purpose after try_files: one check');
    is(backend_hits('/same/a'), 1, 'same purpose after try_files: backend hit');
}

$t->done_testing;
