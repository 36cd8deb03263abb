#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The citizen's data-use log, read through the consent API
# (GET /consents/uses): identity rules, newest first across month lists,
# labels in both languages, paging by cursor that neither skips nor repeats
# while new uses arrive, the retention cut-off, bad input answered with
# problem+json, and the directive's checks.  The entries are written here
# straight into Redis in the documented format; t/consent_uses_events.t
# checks that requests write them.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use POSIX qw(strftime);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8->canonical;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ 'k1' => $KEY ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    civicgate_consent_purposes {
        health   "Layanan kesehatan" "Health services";
        tax      "Perpajakan"        "Taxation";
    }
    civicgate_data_use_retention 40d;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;
        civicgate_channel $http_x_channel;

        location /consents/ {
            civicgate_journey on secure=off;
            civicgate_consent_api;
        }
    }
EOF

$t->run_redis;
$t->run;

my $CITIZEN = 'NIK-3171234567890001';
my $P = pseudonym($KEY, $CITIZEN);
my $DAY = 86400;

sub month_key {
    my ($sec) = @_;
    return "cg:{c:$P}:uses:" . strftime('%Y%m', gmtime $sec);
}

sub uses {
    my ($query, %o) = @_;
    my @h = (defined $o{citizen} ? ('X-Citizen-Id' => $o{citizen})
                                 : ('X-Citizen-Id' => $CITIZEN));
    @h = () if $o{anonymous};
    my $r = $t->request('/consents/uses' . ($query // ''),
        method => $o{method} // 'GET', headers => \@h);
    my $doc = eval { $JSON->decode($r->body) };
    return ($r, $doc);
}

# the whole log, page by page; returns the entries' times (ms)
sub walk {
    my ($limit, $between) = @_;
    my (@seen, $cursor, $pages);
    while (1) {
        my ($r, $doc) = uses("?limit=$limit"
            . (defined $cursor ? "&cursor=$cursor" : ''));
        die 'page: ' . $r->status . ' ' . $r->body unless $r->status == 200;
        push @seen, map { $_->{_ms} = $_->{time}; $_ } @{ $doc->{uses} };
        $pages++;
        $between->() if $between;
        last unless defined $doc->{next};
        $cursor = $doc->{next};
        die 'too many pages' if $pages > 100;
    }
    return (\@seen, $pages);
}

# --- identity and the empty log -------------------------------------------

{
    my ($r, $doc) = uses('', anonymous => 1);
    is($r->status, 401, 'no identity: 401');
    like($r->header('content-type') // '', qr{application/problem\+json},
        'as problem+json');
    ok($r->header('www-authenticate'), 'with a challenge');

    ($r, $doc) = uses('');
    is($r->status, 200, 'an empty log: 200');
    is_deeply($doc, { uses => [], next => undef }, 'no uses, no next page');
    like($r->header('content-type') // '', qr{^application/json},
        'as JSON');
}

# --- entries across months -------------------------------------------------

my $now = time;
my @written;    # [ms, purpose, service, channel, journey], oldest first

# 12 uses this month (or as many minutes as have passed in it), 5 in the
# month before: newest first, whatever the list they are in
{
    my @t0 = gmtime $now;
    my $this_month_start = $now - (($t0[3] - 1) * $DAY + $t0[2] * 3600
        + $t0[1] * 60 + $t0[0]);
    my $prev = $this_month_start - 3 * $DAY;    # inside the month before

    for my $i (0 .. 4) {
        push @written, [ ($prev + $i * 60) * 1000 + $i, 'tax', 'permits',
            'web', sprintf('J%04d', $i) ];
    }
    for my $i (0 .. 11) {
        my $sec = $this_month_start + $i;
        $sec = $now - 12 + $i if $sec > $now;
        push @written, [ $sec * 1000 + 500 + $i, ($i % 3 ? 'health' : 'tax'),
            ($i % 2 ? 'clinic' : ''), ($i % 2 ? 'app' : 'sms'),
            sprintf('J1%03d', $i) ];
    }

    for my $u (@written) {
        $t->redis_cmd('LPUSH', month_key($u->[0] / 1000), join(' ', @$u));
    }
}

{
    my ($r, $doc) = uses('?limit=200');
    is($r->status, 200, 'the log: 200');
    my @got = @{ $doc->{uses} };
    is(scalar @got, scalar @written, 'every use, once');
    my @want = reverse @written;
    my $ok = 1;
    for my $i (0 .. $#want) {
        my ($ms, $p, $s, $c, $j) = @{ $want[$i] };
        my $g = $got[$i] // {};
        my $when = strftime('%Y-%m-%dT%H:%M:%S', gmtime int($ms / 1000))
            . sprintf('.%03dZ', $ms % 1000);
        $ok &&= ($g->{time} // '') eq $when && $g->{purpose} eq $p
            && $g->{service} eq $s && $g->{channel} eq $c
            && $g->{journey} eq $j;
        diag(explain([$g, $want[$i]])) unless $ok;
        last unless $ok;
    }
    ok($ok, 'newest first across the month lists, fields as written');
    my ($health) = grep { $_->{purpose} eq 'health' } @got;
    is_deeply($health->{label},
        { id => 'Layanan kesehatan', en => 'Health services' },
        'the label of each purpose');
    my ($tax) = grep { $_->{purpose} eq 'tax' } @got;
    is_deeply($tax->{label}, { id => 'Perpajakan', en => 'Taxation' },
        'labels in both languages');
    ok(!defined $doc->{next}, 'all on one page: no next');
}

# --- paging: stable while new uses arrive ----------------------------------

{
    my $extra = 0;
    my ($seen, $pages) = walk(3, sub {
        # a new use between pages goes in front: it must not shift the pages
        $extra++;
        my $ms = (time) * 1000 + 900 + $extra;
        $t->redis_cmd('LPUSH', month_key(time),
            join(' ', $ms, 'health', 'late', 'web', "JX$extra"));
    });
    my @journeys = map { $_->{journey} } @$seen;
    is_deeply(\@journeys, [ map { $_->[4] } reverse @written ],
        "$pages pages of 3: every use once, in order, new ones not mixed in");
    ok($pages >= 6, 'several pages');
}

{
    my ($r, $doc) = uses('?limit=1');
    like($doc->{next} // '', qr/^\d{6}(\.\d+)?$/, 'a cursor: month.position');
    like($doc->{uses}[0]{journey}, qr/^JX/, 'the newest first');
}

# --- retention ---------------------------------------------------------------

{
    # a use 45 days old, in a month the 40-day retention still reads from
    # when it is the same month as the cut-off; and one 39 days old
    my $old = ($now - 45 * $DAY) * 1000;
    my $kept = ($now - 39 * $DAY) * 1000;
    $t->redis_cmd('RPUSH', month_key($kept / 1000),
        join(' ', $kept, 'tax', 'archive', 'counter', 'JKEPT'));
    $t->redis_cmd('RPUSH', month_key($old / 1000),
        join(' ', $old, 'tax', 'archive', 'counter', 'JOLD'));
    # RPUSH: the oldest at the tail, as LPUSH of them in time order would
    my ($seen) = walk(7);
    my @j = map { $_->{journey} } @$seen;
    ok((grep { $_ eq 'JKEPT' } @j), 'a use inside the retention is listed');
    ok(!(grep { $_ eq 'JOLD' } @j), 'one older than the retention is not');
    is($j[-1], 'JKEPT', 'and the log ends there');
}

# --- another citizen sees only their own -----------------------------------

{
    my ($r, $doc) = uses('', citizen => 'NIK-3171234567890002');
    is_deeply($doc->{uses}, [], "another citizen's log is their own");
}

# --- a purpose no longer configured ------------------------------------------

{
    $t->redis_cmd('LPUSH', month_key(time),
        join(' ', (time) * 1000 + 999, 'retired', 'old-svc', 'web', 'JR'));
    my ($r, $doc) = uses('?limit=1');
    is($doc->{uses}[0]{purpose}, 'retired', 'a retired purpose is listed');
    ok(exists $doc->{uses}[0]{label} && !defined $doc->{uses}[0]{label},
        'with a null label');
}

# --- bad input -----------------------------------------------------------------

for my $q ('?limit=0', '?limit=201', '?limit=x', '?cursor=abc',
    '?cursor=209901', '?cursor=202613', '?cursor=202612.x',
    '?cursor=202612-4')
{
    my ($r, $doc) = uses($q);
    is($r->status, 400, "$q: 400");
    like($r->header('content-type') // '', qr{application/problem\+json},
        "$q: problem+json");
}

for my $m (qw(POST PUT DELETE)) {
    my ($r) = uses('', method => $m);
    is($r->status, 405, "$m: 405");
    like($r->header('allow') // '', qr/GET, HEAD/, "$m: Allow");
}

{
    my ($r) = uses('', method => 'HEAD');
    is($r->status, 200, 'HEAD: 200');
}

# --- Redis down: 503, and back ------------------------------------------------

{
    $t->stop_redis;
    my ($r) = uses('');
    is($r->status, 503, 'Redis down: 503');
    like($r->header('content-type') // '', qr{application/problem\+json},
        'as problem+json');
}

$t->allow_log(qr/redis|connect\(\)|Connection refused|data-use log/i);

# --- configuration ------------------------------------------------------------

my $n = 0;
for my $bad ([ 'civicgate_data_use_retention 12h;', qr/at least one day/ ],
    [ 'civicgate_data_use_retention 11y;', qr/longer than 10 years/ ],
    [ 'civicgate_data_use_retention forever;', qr/invalid retention/ ],
    [ "civicgate_data_use_retention 1y;\n    civicgate_data_use_retention 1y;",
      qr/is duplicate/ ],
    [ 'civicgate_consent_purposes { uses "Pemakaian" "Uses"; }',
      qr/"uses" is reserved/ ])
{
    my $i = $t->nginx('conf' . ++$n);
    $i->write_secret_file('keys', [ [ 'k1' => $KEY ] ]);
    $i->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    $bad->[0]
    civicgate_consent_purposes { health "Kesehatan" "Health"; }
    server { listen 127.0.0.1:%%PORT_0%%; location / { return 204; } }
EOF
    my ($rc, $out) = $i->test_config;
    isnt($rc, 0, "nginx -t refuses: $bad->[0]");
    like($out, $bad->[1], '... saying why');
}

$t->done_testing;
