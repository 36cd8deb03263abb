#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Journey IDs: minting, reuse, canonicalisation, forgery, rotation,
# parameters, error pages.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JRE = journey_id_re();

my $KA = random_key_hex(32);     # the original key
my $KB = random_key_hex(48);     # prepended later (rotation)
my $KC = random_key_hex(32);     # never in the file

$t->write_secret_file('keys', [ [ 'key-a' => $KA ] ],
    "# comment line\n\n");
$t->write_file('htdocs/index.html', "index\n");
$t->write_file('htdocs/errpage.html', "custom error page\n");

my $ECHO = 'return 200 "jid=[$civicgate_journey_id] new=[$civicgate_journey_new]\n";';

$t->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        root %%TESTDIR%%/htdocs;

        location / {
            civicgate_journey on;
        }
        location /echo {
            civicgate_journey on;
            $ECHO
        }
        location /ep/ {
            civicgate_journey on;
            error_page 404 /errpage.html;
        }
        location = /errpage.html {
            civicgate_journey on;
            internal;
        }
        location /ret404 {
            civicgate_journey on;
            return 404;
        }
        location /off {
            $ECHO
        }
        location /offexplicit {
            civicgate_journey off;
            $ECHO
        }
        location /custom {
            civicgate_journey on header=X-Trace-ID cookie=trail path=/custom
                max_age=1h secure=off httponly=off samesite=strict;
            $ECHO
        }
        location /nocookie {
            civicgate_journey on cookie=off;
            $ECHO
        }
        location /ssnone {
            civicgate_journey on samesite=none;
            $ECHO
        }
        location /ssoff {
            civicgate_journey on samesite=off secure=off;
            $ECHO
        }
        location /metrics {
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name localhost;
        civicgate_journey on;

        location / {
            $ECHO
        }
        location /off {
            civicgate_journey off;
            $ECHO
        }
    }
EOF

$t->run;

sub cookie_for {
    my ($id, %a) = @_;
    return "cg_journey=$id; Path=/; Max-Age=2592000; Secure; HttpOnly; SameSite=Lax";
}

sub counters {
    my $m = $t->metrics;
    return {
        minted => metric($m, 'civicgate_journeys_total', result => 'minted') // -1,
        reused => metric($m, 'civicgate_journeys_total', result => 'reused') // -1,
        forged => metric($m, 'civicgate_journeys_total', result => 'forged') // -1,
    };
}

sub delta {
    my ($before, $after) = @_;
    return { map { $_ => $after->{$_} - $before->{$_} } keys %$after };
}

# check that a response minted a fresh ID under @keys (index 0 expected)
sub is_minted {
    my ($r, $name, @keys) = @_;
    @keys = ($KA) unless @keys;
    my $id = $r->header('X-Journey-ID');
    subtest "$name: minted" => sub {
        is($r->status, 200, 'status 200');
        like($id // '', $JRE, 'X-Journey-ID is canonical');
        is(verify_journey_id($id, @keys), 0, 'verifies under the signing key');
        is_deeply([ $r->header_list('Set-Cookie') ], [ cookie_for($id) ],
            'exactly one Set-Cookie with default attributes');
        is($r->body, "jid=[$id] new=[1]\n", 'variables: id and new=1');
    };
    return $id;
}

sub is_reused {
    my ($r, $want, $name) = @_;
    subtest "$name: reused" => sub {
        is($r->status, 200, 'status 200');
        is($r->header('X-Journey-ID'), $want, 'canonical ID echoed');
        is(scalar($r->header_list('X-Journey-ID')), 1, 'one X-Journey-ID');
        is(scalar($r->header_list('Set-Cookie')), 0, 'no Set-Cookie');
        is($r->body, "jid=[$want] new=[0]\n", 'variables: id and new=0');
    };
}

###########################################################################
# metrics exposition

{
    my $r = $t->request('/metrics');
    is($r->status, 200, 'metrics: 200');
    like($r->header('Content-Type') // '', qr{^text/plain;\s*version=0\.0\.4},
        'metrics: Prometheus content type');
    my $m = parse_metrics($r->body);
    for my $res (qw(minted reused forged)) {
        is(metric($m, 'civicgate_journeys_total', result => $res), 0,
            "metrics: journeys_total{result=\"$res\"} present, 0");
    }
}

###########################################################################
# minting

my $c0 = counters();
my $r = $t->request('/echo');
my $ID = is_minted($r, 'no input');
my $r2 = $t->request('/echo');
my $ID2 = is_minted($r2, 'no input again');
isnt($ID, $ID2, 'two mints differ');

# HTTP/1.0 works the same
is_minted($t->request('/echo', version => '1.0'), 'HTTP/1.0');

# static file
{
    my $r = $t->request('/index.html');
    is($r->status, 200, 'static: 200');
    like($r->header('X-Journey-ID') // '', $JRE, 'static: X-Journey-ID');
    is(scalar($r->header_list('Set-Cookie')), 1, 'static: Set-Cookie');
    is($r->body, "index\n", 'static: body intact');
}

is_deeply(delta($c0, counters()), { minted => 4, reused => 0, forged => 0 },
    'metrics: 4 minted');

###########################################################################
# reuse

$c0 = counters();
is_reused($t->request('/echo', headers => [ 'X-Journey-ID' => $ID ]), $ID,
    'via header');
is_reused($t->request('/echo', headers => [ 'x-journey-id' => $ID ]), $ID,
    'via lower-case header name');
is_reused($t->request('/echo', headers => [ Cookie => "cg_journey=$ID" ]),
    $ID, 'via cookie');
is_reused($t->request('/echo',
        headers => [ Cookie => "a=1; cg_journey=$ID; b=2" ]),
    $ID, 'via cookie among others');
is_reused($t->request('/echo',
        headers => [ Cookie => 'a=1', Cookie => "cg_journey=$ID" ]),
    $ID, 'via second Cookie header');
is_reused($t->request('/echo',
        headers => [ 'X-Journey-ID' => $ID, Cookie => "cg_journey=$ID2" ]),
    $ID, 'header wins over cookie');
is_deeply(delta($c0, counters()), { minted => 0, reused => 6, forged => 0 },
    'metrics: 6 reused');

###########################################################################
# canonicalisation of accepted input

{
    # an ID that contains both 0 and 1, minted independently in Perl
    my $p;
    for (1 .. 10000) {
        $p = mint_journey_id($KA);
        last if $p =~ /0/ && $p =~ /1/;
    }
    like($p, qr/0.*1|1.*0/, 'perl-minted ID with 0 and 1');
    is_reused($t->request('/echo', headers => [ 'X-Journey-ID' => $p ]), $p,
        'perl-minted ID under the file key');

    (my $nohyph = $p) =~ s/-//g;
    my %variants = (
        'no hyphens'          => $nohyph,
        'lower case'          => lc $p,
        'lower, no hyphens'   => lc $nohyph,
        'some hyphens'        => substr($nohyph, 0, 5) . '-'
            . substr($nohyph, 5, 10) . '-' . substr($nohyph, 15),
        'hyphens elsewhere'   => substr($nohyph, 0, 3) . '-'
            . substr($nohyph, 3, 9) . '-' . substr($nohyph, 12, 7) . '-'
            . substr($nohyph, 19),
        'I and O'             => ($p =~ tr/10/IO/r),
        'i and o'             => ($p =~ tr/10/io/r),
        'L for 1'             => ($p =~ tr/1/L/r),
        'l for 1'             => ($p =~ tr/1/l/r),
        'mixed case'          => join('', map { $_ % 2 ? lc substr($p, $_, 1)
            : substr($p, $_, 1) } 0 .. length($p) - 1),
    );
    for my $name (sort keys %variants) {
        is_reused($t->request('/echo',
                headers => [ 'X-Journey-ID' => $variants{$name} ]),
            $p, "input $name ($variants{$name})");
    }
    is_reused($t->request('/echo',
            headers => [ Cookie => 'cg_journey=' . lc($nohyph) =~ tr/1/l/r ]),
        $p, 'cookie input canonicalised');
}

###########################################################################
# forged and malformed input

sub change_symbol {
    my ($id, $pos) = @_;
    my $alphabet = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    my @c = split //, $id;
    my @sym = grep { $c[$_] ne '-' } 0 .. $#c;
    my $i = $sym[$pos];
    my $k = index($alphabet, $c[$i]);
    $c[$i] = substr($alphabet, ($k + 7) % 32, 1);
    return join '', @c;
}

{
    my $forged = change_symbol($ID, 7);
    isnt($forged, $ID, 'one symbol changed');
    ok(!defined verify_journey_id($forged, $KA), 'changed ID is invalid (perl)');

    my $c1 = counters();
    my $mark = $t->log_mark;
    my $r = $t->request('/echo', headers => [ 'X-Journey-ID' => $forged ]);
    my $new = is_minted($r, 'one symbol changed');
    isnt($new, $forged, 'forged ID not echoed');
    isnt($new, $ID, 'original ID not resurrected');
    my $log = $t->log_since($mark);
    like($log, qr/\[info\].*civicgate: invalid journey ID replaced/,
        'info log line for the replaced ID');
    unlike($log, qr/\Q$forged\E/, 'forged value not logged');
    (my $fsym = $forged) =~ s/-//g;
    unlike($log, qr/\Q$fsym\E/i, 'forged value not logged (no hyphens)');
    is_deeply(delta($c1, counters()), { minted => 1, reused => 0, forged => 1 },
        'metrics: forged +1, minted +1');
}

{
    # last symbol, and first symbol
    for my $pos (0, 19) {
        my $forged = change_symbol($ID, $pos);
        my $r = $t->request('/echo', headers => [ 'X-Journey-ID' => $forged ]);
        my $new = is_minted($r, "symbol $pos changed");
        isnt($new, canonical_journey_id($forged), "symbol $pos: not trusted");
    }
}

{
    (my $sym = $ID) =~ s/-//g;
    my $other = mint_journey_id($KC);
    my %bad = (
        'truncated (19 symbols)'   => substr($sym, 0, 19),
        'truncated group'          => substr($ID, 0, 22),
        'overlong (21 symbols)'    => $sym . 'A',
        'overlong with hyphen'     => "$ID-A",
        'garbage'                  => 'hello',
        'garbage long'             => 'x' x 60,
        'contains U'               => substr($sym, 0, 10) . 'U'
            . substr($sym, 11),
        'contains space'           => substr($ID, 0, 5) . ' '
            . substr($ID, 6),
        'contains underscore'      => substr($ID, 0, 5) . '_'
            . substr($ID, 6),
        'key not in file'          => $other,
        'all zero'                 => '00000-00000-00000-00000',
        'only hyphens'             => '-----',
        'very long'                => $sym x 10,
    );
    my $c1 = counters();
    my $mark = $t->log_mark;
    for my $name (sort keys %bad) {
        my $r = $t->request('/echo',
            headers => [ 'X-Journey-ID' => $bad{$name} ]);
        my $new = is_minted($r, "malformed: $name");
        isnt($new, canonical_journey_id($bad{$name}) // '',
            "malformed: $name: not echoed");
    }
    my $n = keys %bad;
    is_deeply(delta($c1, counters()), { minted => $n, reused => 0,
            forged => $n }, "metrics: $n forged, $n minted");
    my $log = $t->log_since($mark);
    my $lines = () = $log =~ /civicgate: invalid journey ID replaced/g;
    is($lines, $n, "$n info lines for $n replaced IDs");
    unlike($log, qr/\Q$sym\E/, 'raw values not logged');

    # forged via cookie
    $c1 = counters();
    my $r = $t->request('/echo',
        headers => [ Cookie => 'cg_journey=' . change_symbol($ID, 3) ]);
    is_minted($r, 'forged cookie');
    is_deeply(delta($c1, counters()), { minted => 1, reused => 0, forged => 1 },
        'metrics: forged cookie counted');

    # an invalid header is not rescued by a valid cookie: the header is read
    $c1 = counters();
    $r = $t->request('/echo', headers => [ 'X-Journey-ID' => 'garbage',
        Cookie => "cg_journey=$ID" ]);
    my $new = is_minted($r, 'bad header, good cookie');
    isnt($new, $ID, 'bad header, good cookie: cookie not used');
    is_deeply(delta($c1, counters()), { minted => 1, reused => 0, forged => 1 },
        'metrics: bad header counted as forged');
}

###########################################################################
# journey off

for my $loc ('/off', '/offexplicit') {
    my $r = $t->request($loc, headers => [ 'X-Journey-ID' => $ID ]);
    is($r->status, 200, "$loc: 200");
    is($r->header('X-Journey-ID'), undef, "$loc: no X-Journey-ID");
    is($r->header('Set-Cookie'), undef, "$loc: no Set-Cookie");
    is($r->body, "jid=[] new=[]\n", "$loc: empty variables");
}
{
    my $p1 = $t->port(1);
    my $r = $t->request('/x', port => $p1);
    my $id = is_minted($r, 'server-level on, inherited');
    is_reused($t->request('/x', port => $p1,
            headers => [ 'X-Journey-ID' => $id ]), $id,
        'server-level on, inherited');
    $r = $t->request('/off', port => $p1);
    is($r->header('X-Journey-ID'), undef, 'location off in server on: no header');
    is($r->header('Set-Cookie'), undef, 'location off in server on: no cookie');
    is($r->body, "jid=[] new=[]\n", 'location off in server on: empty vars');
}

###########################################################################
# error pages

{
    my $r = $t->request('/does-not-exist');
    is($r->status, 404, 'missing file: 404');
    like($r->header('X-Journey-ID') // '', $JRE, '404 page: X-Journey-ID');
    ok(defined verify_journey_id($r->header('X-Journey-ID'), $KA),
        '404 page: valid ID');

    is(scalar($r->header_list('Set-Cookie')), 1, '404 page: minted, Set-Cookie');

    my $c1 = counters();
    $r = $t->request('/ep/missing');
    is($r->status, 404, 'error_page: 404');
    is($r->body, "custom error page\n", 'error_page: custom page served');
    is(scalar($r->header_list('X-Journey-ID')), 1, 'error_page: one X-Journey-ID');
    is(scalar($r->header_list('Set-Cookie')), 1, 'error_page: one Set-Cookie');
    ok(defined verify_journey_id($r->header('X-Journey-ID'), $KA),
        'error_page: valid ID');
    is_deeply(delta($c1, counters()), { minted => 1, reused => 0, forged => 0 },
        'error_page: one request, one mint');
    $r = $t->request('/ep/missing', headers => [ 'X-Journey-ID' => $ID ]);
    is($r->header('X-Journey-ID'), $ID, 'error_page: reused ID echoed');
    is($r->header('Set-Cookie'), undef, 'error_page: reused, no Set-Cookie');

    $r = $t->request('/does-not-exist', headers => [ 'X-Journey-ID' => $ID ]);
    is($r->status, 404, 'missing file with ID: 404');
    is($r->header('X-Journey-ID'), $ID, '404 page: reused ID echoed');

    $r = $t->request('/ret404');
    is($r->status, 404, 'return 404');
    like($r->header('X-Journey-ID') // '', $JRE, 'return 404: X-Journey-ID');

    $r = $t->request('/ret404', headers => [ 'X-Journey-ID' => lc $ID ]);
    is($r->header('X-Journey-ID'), $ID, 'return 404: canonical ID echoed');
}

###########################################################################
# parameters

{
    my $r = $t->request('/custom');
    is($r->status, 200, 'custom: 200');
    my $id = $r->header('X-Trace-ID');
    like($id // '', $JRE, 'custom: header name X-Trace-ID');
    is($r->header('X-Journey-ID'), undef, 'custom: no X-Journey-ID');
    is_deeply([ $r->header_list('Set-Cookie') ],
        [ "trail=$id; Path=/custom; Max-Age=3600; SameSite=Strict" ],
        'custom: cookie name and attributes');

    $r = $t->request('/custom', headers => [ 'X-Trace-ID' => $id ]);
    is($r->header('X-Trace-ID'), $id, 'custom: reused via X-Trace-ID');
    is($r->header('Set-Cookie'), undef, 'custom: no Set-Cookie on reuse');
    is($r->body, "jid=[$id] new=[0]\n", 'custom: new=0');

    $r = $t->request('/custom', headers => [ Cookie => "trail=$id" ]);
    is($r->header('X-Trace-ID'), $id, 'custom: reused via trail cookie');

    $r = $t->request('/custom', headers => [ 'X-Journey-ID' => $id,
        Cookie => "cg_journey=$id" ]);
    isnt($r->header('X-Trace-ID'), $id,
        'custom: default header and cookie names are not read');
    like($r->body, qr/new=\[1\]/, 'custom: minted');

    $r = $t->request('/nocookie');
    $id = $r->header('X-Journey-ID');
    like($id // '', $JRE, 'cookie=off: header');
    is($r->header('Set-Cookie'), undef, 'cookie=off: no Set-Cookie');
    $r = $t->request('/nocookie', headers => [ Cookie => "cg_journey=$id" ]);
    isnt($r->header('X-Journey-ID'), $id, 'cookie=off: cookie not read');
    $r = $t->request('/nocookie', headers => [ 'X-Journey-ID' => $id ]);
    is($r->header('X-Journey-ID'), $id, 'cookie=off: header read');

    $r = $t->request('/ssnone');
    $id = $r->header('X-Journey-ID') // '';
    is($r->header('Set-Cookie'),
        "cg_journey=$id; Path=/; Max-Age=2592000; Secure; HttpOnly; SameSite=None",
        'samesite=none');

    $r = $t->request('/ssoff');
    $id = $r->header('X-Journey-ID') // '';
    is($r->header('Set-Cookie'),
        "cg_journey=$id; Path=/; Max-Age=2592000; HttpOnly",
        'samesite=off secure=off');
}

###########################################################################
# key rotation

{
    my $old_nginx = $ID;                       # minted by nginx under A
    my $old_perl = mint_journey_id($KA);
    is(verify_journey_id($old_nginx, $KA), 0, 'nginx-minted ID verifies under A');

    # an ID under C is forged now
    my $r = $t->request('/echo',
        headers => [ 'X-Journey-ID' => mint_journey_id($KC) ]);
    is_minted($r, 'ID under unknown key C');

    $t->write_secret_file('keys', [ [ 'key-b' => $KB ], [ 'key-a' => $KA ] ]);
    ok($t->reload, 'reload with key B prepended');

    is_reused($t->request('/echo', headers => [ 'X-Journey-ID' => $old_nginx ]),
        $old_nginx, 'rotation: old nginx-minted ID');
    is_reused($t->request('/echo', headers => [ Cookie => "cg_journey=$old_perl" ]),
        $old_perl, 'rotation: old perl-minted ID via cookie');
    my $pb = mint_journey_id($KB);
    is_reused($t->request('/echo', headers => [ 'X-Journey-ID' => $pb ]),
        $pb, 'rotation: perl-minted ID under B');

    for my $i (1 .. 5) {
        my $r = $t->request('/echo');
        my $id = is_minted($r, "rotation: mint $i", $KB, $KA);
        ok(!defined verify_journey_id($id, $KA),
            "rotation: mint $i signed by B, not A");
    }

    $r = $t->request('/echo',
        headers => [ 'X-Journey-ID' => mint_journey_id($KC) ]);
    is_minted($r, 'rotation: ID under unknown key C', $KB);

    # dropping A: old IDs become invalid
    $t->write_secret_file('keys', [ [ 'key-b' => $KB ] ]);
    ok($t->reload, 'reload with key A removed');
    $r = $t->request('/echo', headers => [ 'X-Journey-ID' => $old_nginx ]);
    my $id = is_minted($r, 'A removed: old ID', $KB);
    isnt($id, $old_nginx, 'A removed: old ID replaced');
}

# counters survive reloads
{
    my $c = counters();
    ok($c->{minted} > 20 && $c->{reused} > 20 && $c->{forged} > 10,
        'metrics after reloads keep earlier counts')
        or diag explain $c;
}

$t->done_testing;
