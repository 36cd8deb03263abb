#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Requests write the citizen's data-use log (docs/data-use.md):
#
# A. A request that passes a consent check records one use per purpose
#    with its journey event; a refused one, one without consent checks and
#    one after which an internal redirect was refused record nothing; the
#    citizen reads them at GET /consents/uses.
# B. Cost: one LPUSH per consent-checked request, EXPIREAT only when a
#    month list is created; its expiry is the retention after the end of
#    the month; no raw identifier reaches Redis.
# C. With Redis down, uses wait in the spool with their event, also those
#    of a request with many long purpose names (an event of several spool
#    slots), and reach Redis unchanged when it is back.
# D. civicgate_data_use_retention off records nothing.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use POSIX qw(strftime);
use Time::Local qw(timegm);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

# eight purposes of 60 characters: a request passing them all records an
# event wider than two spool slots
my @LONG = map { sprintf('purpose-%d-%s', $_, 'x' x 50) } 1 .. 8;
my $LONG_PURPOSES = join "\n", map { "        $_ \"Tujuan $_\" \"Purpose $_\";" }
    @LONG;
my $LONG_CONSENT = join ' ', @LONG;
my $API = api_locations(qw(consents metrics));
my $BACKEND = backend_server(1);

$t->write_nginx_conf(<<"EOF", worker_processes => 1);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=300ms;
    civicgate_consent_cache zone=consent:1m ttl=60s;
    civicgate_data_use_retention 400d;

    civicgate_consent_purposes {
        health   "Layanan kesehatan" "Health services";
        tax      "Perpajakan"        "Taxation";
$LONG_PURPOSES
    }

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on secure=off;
        civicgate_channel \$http_x_channel;
        civicgate_citizen \$http_x_citizen_id;

        location /clinic/ {
            civicgate_service clinic;
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /both/ {
            civicgate_service both;
            civicgate_consent health tax;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /free/ {
            civicgate_service free;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /redirect/ {
            civicgate_service redirect;
            civicgate_consent health;
            rewrite ^ /taxonly/ last;
        }
        location /taxonly/ {
            civicgate_service taxonly;
            civicgate_consent tax;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /long/ {
            civicgate_service long;
            civicgate_consent $LONG_CONSENT;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
$API
    }

$BACKEND
EOF

$t->run_redis;
$t->run;

my $CITIZEN = 'NIK-3171000000000077';
my $P = pseudonym($KEY, $CITIZEN);

sub req {
    my ($path, %o) = @_;
    return $t->citizen_request($path, $o{citizen} // $CITIZEN,
        channel => 'app', %o);
}

sub uses {
    my $r = req('/consents/uses?limit=200');
    return undef unless $r->status == 200;
    return $JSON->decode($r->body)->{uses};
}

sub stats {
    my $info = $t->redis_query('INFO', 'commandstats') // '';
    my %c;
    $c{$1} = $2 while $info =~ /^cmdstat_([\w|]+):calls=(\d+)/mg;
    return \%c;
}

sub cache_hits {
    return $t->metrics->{'civicgate_consent_cache_total{result="hit"}'} // 0;
}

sub grant {
    my ($purpose) = @_;
    my $r = req("/consents/$purpose", method => 'PUT', body => '{}');
    is($r->status, 201, "granted $purpose");
}

my $month_key = "cg:{c:$P}:uses:" . strftime('%Y%m', gmtime);

# --- A. what is recorded ---------------------------------------------------------

grant('health');

my $before = stats();
my $r = req('/clinic/', channel => 'web');
is($r->status, 200, 'consented request passes');
my $jid = $r->header('X-Journey-ID');
like($jid, journey_id_re(), 'with a journey');
is(req('/clinic/', channel => 'sms', journey => $jid)->status, 200,
    'again, on another channel');
is(req('/free/')->status, 200, 'a request without consent check');
is(req('/both/')->status, 403, 'refused: tax not granted');
is(req('/redirect/')->status, 403,
    'health passed, then refused after the internal redirect');
is(req('/clinic/', citizen => 'NIK-3171000000000078')->status, 403,
    'another citizen without consent: refused');

ok($t->wait_until(sub { my $u = uses(); $u && @$u >= 2 }, timeout => 5),
    'the uses reach the log');
sleep 0.3;
my $u = uses();
is(scalar @$u, 2, 'two uses: the two passing requests, nothing else');
is_deeply([ map { "$_->{purpose} $_->{service} $_->{channel} $_->{journey}" }
    @$u ], [ "health clinic sms $jid", "health clinic web $jid" ],
    'newest first: purpose, service, channel, journey');
is_deeply($u->[0]{label}, { id => 'Layanan kesehatan', en => 'Health services' },
    'with its labels');
like($u->[0]{time}, qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/,
    'the time, to the millisecond');

my $after = stats();
is(($after->{lpush} // 0) - ($before->{lpush} // 0), 2,
    'one LPUSH per consent-checked request that passed');
is(($after->{expireat} // 0) - ($before->{expireat} // 0), 1,
    'EXPIREAT once: when the month list was created');

grant('tax');
is(req('/both/')->status, 200, 'both purposes granted: passes');
ok($t->wait_until(sub { @{ uses() } == 4 }, timeout => 5),
    'two purposes, two uses');
$u = uses();
is_deeply([ sort map { $_->{purpose} } @$u[0, 1] ], [ 'health', 'tax' ],
    'one use per purpose of the request');
is($u->[0]{time}, $u->[1]{time}, 'at the same time');

# --- B. expiry, and no raw identifier ---------------------------------------------

{
    my $ttl = $t->redis_query('TTL', $month_key);
    my @now = gmtime;
    my ($y, $m) = ($now[5] + 1900, $now[4] + 1);
    ($y, $m) = $m == 12 ? ($y + 1, 1) : ($y, $m + 1);
    my $want = timegm(0, 0, 0, 1, $m - 1, $y) + 400 * 86400 - time;
    ok(abs($ttl - $want) < 30,
        "the month list expires 400 days after the month ends ($ttl s)");
    my @keys = $t->redis_scan_keys('*');
    ok(!grep({ /\Q$CITIZEN\E/ } @keys), 'no key names the raw identifier');
    my $all = join "\n", @{ $t->redis_query('LRANGE', $month_key, 0, -1) };
    unlike($all, qr/\Q$CITIZEN\E/, 'no use holds it');
    is($t->redis_query('TYPE', $month_key), 'list', 'a list per month');
}

# --- C. through a Redis outage, wide events included -------------------------------

grant($_) for @LONG;
{
    # the grants evicted the citizen's cached decisions: decided again
    is(req('/clinic/')->status, 200, 'cached again: health');
    is(req('/long/')->status, 200, 'cached again: the long purposes');
    # a grant's invalidation arriving late, or the subscriber reconnecting
    # on a loaded machine, evicts them again: cached once all nine hit
    ok($t->wait_until(sub {
        my $h = cache_hits();
        req('/clinic/');
        req('/long/');
        return cache_hits() - $h == 9 || !select(undef, undef, undef, 0.1);
    }, timeout => 10), 'both cached: nine hits');
    $t->stop_redis;
    is(req('/clinic/', channel => 'counter')->status, 200,
        'Redis down: a cached consent still passes');
    is(req('/long/')->status, 200, 'and the eight long purposes');
    my $m = $t->metrics;
    ok(($m->{'civicgate_event_spool_events'} // 0) >= 1 + 6,
        'spooled: the wide event takes several slots')
        or diag explain $m->{'civicgate_event_spool_events'};
    # a Redis without persistence: what it held is gone, the spool is not
    $t->run_redis;
    ok($t->wait_until(sub { my $x = eval { uses() }; $x && @$x >= 9 },
        timeout => 15), 'after the restart: the spooled uses arrive');
    $u = uses();
    my %p = map { $_->{purpose} => $_ } @$u[0 .. 8];
    is_deeply([ sort keys %p ], [ sort('health', @LONG) ],
        'every purpose, names whole');
    is($p{health}{channel}, 'counter', 'with its channel');
    is($p{$LONG[7]}{service}, 'long', 'and its service');
}

$t->allow_log(qr/redis|connect\(\)|Connection refused|journey event/i);

# --- D. off --------------------------------------------------------------------------

{
    my $o = $t->nginx('off');
    $o->write_secret_file('keys', [ [ k1 => $KEY ] ]);
    $o->write_nginx_conf(<<'EOF', worker_processes => 1);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_data_use_retention off;
    civicgate_consent_purposes { health "Kesehatan" "Health"; }
    server {
        listen 127.0.0.1:%%PORT_off%%;
        civicgate_journey on secure=off;
        civicgate_citizen $http_x_citizen_id;
        location /clinic/ {
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_offb%%;
        }
        location /consents/ { civicgate_consent_api; }
    }
    server {
        listen 127.0.0.1:%%PORT_offb%%;
        location / { return 200; }
    }
EOF
    $o->run;
    my $port = $o->port('off');
    my $c = 'NIK-3171000000000099';
    my $q = pseudonym($KEY, $c);
    is($o->request('/consents/health', method => 'PUT', body => '{}',
        headers => [ 'X-Citizen-Id' => $c ], port => $port)->status, 201, 'off: granted');
    is($o->request('/clinic/', headers => [ 'X-Citizen-Id' => $c ], port => $port)->status,
        200, 'off: passes');
    sleep 0.5;
    my @k = $o->redis_scan_keys("cg:{c:$q}:uses:*");
    is(scalar @k, 0, 'off: no use recorded');
    is($o->request('/consents/uses', headers => [ 'X-Citizen-Id' => $c ], port => $port)
        ->status, 404, 'off: the log answers 404');
    $o->stop;
}

$t->done_testing;
