#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The status endpoint, the consent API and the admin endpoints route on
# the part of the URI their location gives them, whatever the kind of
# location: after the prefix of a prefix location, the last capture of a
# regex location, nothing in an exact location (the endpoint's root).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    civicgate_consent_purposes {
        health   "Layanan kesehatan" "Health services";
        tax      "Perpajakan"        "Taxation";
    }

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;

        location /tax/ {
            civicgate_journey on secure=off;
            civicgate_service tax;
            return 200 "tax\n";
        }

        location /consents/ {
            civicgate_consent_api;
        }
        location ~ ^/v2/consents/(.*)$ {
            civicgate_consent_api;
        }
        location = /mine/consents {
            civicgate_consent_api;
        }

        location ~ ^/v2/admin/(.*)$ {
            civicgate_admin;
        }
        location = /ops/admin {
            civicgate_admin;
        }

        location ~ ^/v2/status(/.*)?$ {
            civicgate_status;
        }
        location ~ ^/v3/status {
            civicgate_status;
        }
        location = /now/status {
            civicgate_status;
        }
    }
EOF

$t->run_redis;
$t->run;

my $CITIZEN = 'NIK-3171234567890001';

sub json_of { my ($r) = @_; return eval { $JSON->decode($r->body // '') } }

sub api {
    my ($method, $path, $body) = @_;
    return $t->request($path, method => $method,
        headers => [ 'X-Citizen-Id' => $CITIZEN,
            (defined $body ? ('Content-Type' => 'application/json') : ()) ],
        (defined $body ? (body => $body) : ()));
}

###########################################################################
# consent API: a purpose by the regex's capture; the list at an exact one

{
    my $p = api(GET => '/consents/tax');
    is($p->status, 200, 'prefix: GET <api>tax: 200') or diag $p->raw;
    is((json_of($p) // {})->{purpose}, 'tax', 'prefix: the purpose');

    my $r = api(GET => '/v2/consents/tax');
    is($r->status, 200, 'regex: GET <api>tax: 200') or diag $r->raw;
    is_deeply(json_of($r), json_of($p), 'regex: the same answer as prefix');

    my $u = api(GET => '/v2/consents/nope');
    is($u->status, 400, 'regex: an unknown purpose: 400') or diag $u->raw;
    like($u->body // '', qr/unknown-purpose/, 'regex: unknown-purpose');

    my $l = api(GET => '/mine/consents');
    is($l->status, 200, 'exact: GET: the list, 200') or diag $l->raw;
    is_deeply(json_of($l), json_of(api(GET => '/consents/')),
        'exact: the same list as the prefix location\'s root');
}

###########################################################################
# admin: maintenance and a service by the regex's capture

{
    my $m = $t->request('/v2/admin/maintenance', method => 'PUT');
    is($m->status, 200, 'regex: PUT <admin>maintenance: 200') or diag $m->raw;
    like($m->body // '', qr/maintenance/, 'regex: the maintenance answer');

    my $u = $t->request('/v2/admin/services/nope', method => 'PUT',
        headers => [ 'Content-Type' => 'application/json' ],
        body => '{"state":"degraded"}');
    is($u->status, 404, 'regex: an unknown service: 404') or diag $u->raw;
    like($u->body // '', qr/unknown-service/, 'regex: routed to services');

    my $e = $t->request('/ops/admin', method => 'PUT');
    is($e->status, 404, 'exact: the root has no resource: 404')
        or diag $e->raw;
}

###########################################################################
# status: a journey's timeline by the regex's capture

{
    my $r = $t->request('/tax/a', headers => [ 'X-Citizen-Id' => $CITIZEN ]);
    my $J = $r->header('X-Journey-ID');
    ok(defined $J, 'a journey ID');
    $J //= '';
    ok($t->wait_until(sub {
        $t->journey_length($J) >= 1 },
        timeout => 5), 'its event is in Redis');

    my $tl = $t->request("/v2/status/journeys/$J");
    is($tl->status, 200, 'regex: GET <status>journeys/{id}: 200')
        or diag $tl->raw;
    is((json_of($tl) // {})->{journey}, $J, 'regex: the journey');

    for my $path ('/v2/status', '/v2/status/', '/now/status') {
        my $s = $t->request($path);
        is($s->status, 200, "$path: the status, 200") or diag $s->raw;
        ok(ref((json_of($s) // {})->{services}), "$path: services");
    }

    my $n = $t->request("/v3/status/journeys/$J");
    is($n->status, 200, 'regex without a capture: the root') or diag $n->raw;
    ok(ref((json_of($n) // {})->{services}), 'regex without a capture:'
        . ' the services, not the journey');
}

$t->done_testing;
