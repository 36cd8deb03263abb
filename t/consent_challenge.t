#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Every 401 carries WWW-Authenticate (RFC 9110, 11.6.1) with the challenge
# of civicgate_citizen_challenge (default: Bearer realm="civicgate"): the
# consent check in a location, in a location reached by try_files, in an
# auth_request subrequest (passed on by auth_request), and every consent
# API route that needs the identity.  The consent API checks the route and
# the method before the identity: an unknown purpose is 400 and a method
# the resource never allows is 405, with or without identity.  Other
# answers (403, 405, 400) carry no challenge.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    civicgate_consent_purposes {
        tax    "Perpajakan"    "Taxation";
    }

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;

        location /tax/ {
            civicgate_consent tax;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /la/ {
            try_files /nonexistent @svc;
        }
        location @svc {
            civicgate_consent tax;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /ar/ {
            auth_request /authz;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location = /authz {
            internal;
            civicgate_consent tax;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /portal/ {
            civicgate_citizen_challenge 'Bearer realm="portal.example.go.id"';
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

$t->run_redis;
$t->run;

my $DEFAULT = 'Bearer realm="civicgate"';

sub req {
    my ($method, $path, %o) = @_;
    my @h;
    push @h, 'X-Citizen-Id' => $o{citizen} if defined $o{citizen};
    return $t->request($path, method => $method, headers => \@h,
        (defined $o{body} ? (body => $o{body}) : ()));
}

sub challenged {
    my ($r, $want, $name) = @_;
    is($r->status, 401, "$name: 401") or diag $r->raw;
    is_deeply([ $r->header_list('WWW-Authenticate') ], [ $want ],
        "$name: one WWW-Authenticate: $want");
}

sub not_challenged {
    my ($r, $status, $name) = @_;
    is($r->status, $status, "$name: $status") or diag $r->raw;
    is($r->header('WWW-Authenticate'), undef, "$name: no WWW-Authenticate");
}

# the consent check, however the location is reached
challenged(req('GET', '/tax/a'), $DEFAULT, 'consent check');
challenged(req('GET', '/la/a'), $DEFAULT, 'consent check after try_files');
challenged(req('GET', '/ar/a'), $DEFAULT, 'auth_request subrequest');
challenged(req('GET', '/portal/a'), 'Bearer realm="portal.example.go.id"',
    'civicgate_citizen_challenge');

# every consent API route that acts for the citizen
challenged(req('GET', '/consents/'), $DEFAULT, 'API: GET list');
challenged(req('HEAD', '/consents/'), $DEFAULT, 'API: HEAD list');
challenged(req('GET', '/consents/receipts/'), $DEFAULT, 'API: GET receipts/');
challenged(req('GET', '/consents/tax'), $DEFAULT, 'API: GET purpose');
challenged(req('PUT', '/consents/tax', body => '{}'), $DEFAULT,
    'API: PUT purpose');
challenged(req('DELETE', '/consents/tax'), $DEFAULT, 'API: DELETE purpose');

# route, then method, then identity
{
    my $r = req('PATCH', '/consents/tax', body => '{}');
    not_challenged($r, 405, 'API: PATCH without identity');
    is($r->header('Allow'), 'GET, HEAD, PUT, DELETE',
        'API: PATCH without identity: Allow');

    $r = req('POST', '/consents/', body => '{}');
    not_challenged($r, 405, 'API: POST list without identity');
    is($r->header('Allow'), 'GET, HEAD', 'API: POST list: Allow');

    $r = req('GET', '/consents/receipts/verify');
    not_challenged($r, 405, 'API: GET verify without identity');

    $r = req('PUT', '/consents/nope', body => '{}');
    not_challenged($r, 400, 'API: unknown purpose without identity');
    like($r->body // '', qr/unknown-purpose/,
        'API: unknown purpose without identity: unknown-purpose');

    $r = req('POST', '/consents/receipts/verify', body => '{}');
    not_challenged($r, 400, 'API: verify needs no identity');
}

# a refusal with an identity is 403, not a challenge
not_challenged(req('GET', '/tax/a', citizen => 'CIT-1'), 403,
    'consent refused');
is(scalar(() = $t->access_log =~ /"GET \/(?:tax|la|ar|portal)\/a[^"]*" 200/g),
    0, 'no 401 or 403 reached a backend');

$t->done_testing;
