#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Variables seen by an upstream and by the access log; citizen pseudonyms
# computed independently; pseudonym stability across reload and instances;
# pseudonym_key=; the raw citizen value never reaches a log.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JRE = journey_id_re();

my $K1 = random_key_hex(32);    # oldest: pseudonymises by default
my $K2 = random_key_hex(64);    # newest: signs journeys
my $K3 = random_key_hex(32);    # prepended later

my $CITIZEN = 'CITIZEN-7f3a9-raw-ID-zq41';
my @KEYS = ([ 'k2' => $K2 ], [ 'k1' => $K1 ]);
$t->write_secret_file('keys', \@KEYS);

my $CG = 'civicgate_channel $http_x_channel;
            civicgate_citizen $http_x_citizen_id;
            civicgate_journey on;';
my $VARS = 'ch=[$civicgate_channel] jid=[$civicgate_journey_id] '
    . 'new=[$civicgate_journey_new] cit=[$civicgate_citizen] '
    . 'svc=[$civicgate_service]';

$t->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_service payments;

    log_format cg '\$civicgate_channel|\$civicgate_journey_id|\$civicgate_journey_new|\$civicgate_citizen|\$civicgate_service|\$status|\$uri';

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        access_log %%TESTDIR%%/cg.log cg;
        access_log %%TESTDIR%%/access.log;

        location /p {
            $CG
            proxy_pass http://127.0.0.1:%%PORT_1%%/backend;
            proxy_set_header X-CG-Channel \$civicgate_channel;
            proxy_set_header X-CG-Journey \$civicgate_journey_id;
            proxy_set_header X-CG-New \$civicgate_journey_new;
            proxy_set_header X-CG-Citizen \$civicgate_citizen;
            proxy_set_header X-CG-Service \$civicgate_service;
            proxy_set_header X-Citizen-ID "";
        }
        location /v {
            $CG
            return 200 "$VARS\\n";
        }
        location /svc {
            civicgate_service benefits-2;
            return 200 "$VARS\\n";
        }
        location /lit {
            civicgate_citizen "fixed user";
            return 200 "$VARS\\n";
        }
        location /plain {
            return 200 "$VARS\\n";
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name localhost;
        access_log %%TESTDIR%%/backend.log;

        location /backend {
            return 200 "ch=[\$http_x_cg_channel] jid=[\$http_x_cg_journey] new=[\$http_x_cg_new] cit=[\$http_x_cg_citizen] svc=[\$http_x_cg_service] raw=[\$http_x_citizen_id]\\n";
        }
    }
EOF

$t->run;

sub vars {
    my ($body) = @_;
    my %v;
    while (($body // '') =~ /(\w+)=\[([^\]]*)\]/g) {
        $v{$1} = $2;
    }
    return \%v;
}

my $P1 = pseudonym($K1, $CITIZEN);
like($P1, qr/^[0-9a-f]{32}$/, 'perl pseudonym is 32 lowercase hex digits');

###########################################################################
# upstream sees the variables

my $ID;
{
    my $r = $t->request('/p', headers => [ 'X-Channel' => 'Web',
        'X-Citizen-ID' => $CITIZEN ]);
    is($r->status, 200, 'proxied: 200');
    $ID = $r->header('X-Journey-ID');
    like($ID // '', $JRE, 'proxied: X-Journey-ID on the response');
    is(verify_journey_id($ID, $K2, $K1), 0, 'proxied: signed by newest key');
    is_deeply(vars($r->body), { ch => 'web', jid => $ID, new => 1,
            cit => $P1, svc => 'payments', raw => '' },
        'backend saw channel, journey, new=1, pseudonym, service');

    $r = $t->request('/p', headers => [ 'X-Channel' => 'sms',
        'X-Citizen-ID' => $CITIZEN, 'X-Journey-ID' => $ID ]);
    is_deeply(vars($r->body), { ch => 'sms', jid => $ID, new => 0,
            cit => $P1, svc => 'payments', raw => '' },
        'backend saw reused journey, new=0');
    is($r->header('X-Journey-ID'), $ID, 'proxied: reused ID echoed');

    $r = $t->request('/p');
    my $v = vars($r->body);
    is($v->{ch}, 'unknown', 'backend: channel unknown without header');
    is($v->{cit}, '', 'backend: no pseudonym without citizen');
    is($v->{new}, 1, 'backend: minted');
}

###########################################################################
# pseudonyms

{
    my %cases = (
        'plain'      => $CITIZEN,
        'digits'     => '1234567890',
        'spaces'     => 'a b  c',
        'utf-8'      => "J\xc3\xbcrgen-\xe2\x82\xac",
        'long'       => 'L' x 2000,
        'one byte'   => 'x',
        'case'       => lc $CITIZEN,
    );
    my %seen;
    for my $name (sort keys %cases) {
        my $r = $t->request('/v',
            headers => [ 'X-Citizen-ID' => $cases{$name} ]);
        my $got = vars($r->body)->{cit};
        is($got, pseudonym($K1, $cases{$name}),
            "pseudonym ($name) = HMAC under the oldest key's citizen subkey");
        $seen{$got // ''}++;
    }
    is(scalar keys %seen, scalar keys %cases, 'pseudonyms distinct');
    isnt(pseudonym($K1, $CITIZEN), pseudonym($K2, $CITIZEN),
        'keys give different pseudonyms');

    my $r = $t->request('/v', headers => [ 'X-Citizen-ID' => '' ]);
    is(vars($r->body)->{cit}, '', 'empty citizen -> empty pseudonym');
    $r = $t->request('/v');
    is(vars($r->body)->{cit}, '', 'absent citizen -> empty pseudonym');
    $r = $t->request('/plain', headers => [ 'X-Citizen-ID' => $CITIZEN ]);
    is_deeply(vars($r->body), { ch => 'unknown', jid => '', new => '',
            cit => '', svc => 'payments' },
        'no civicgate_citizen/journey: empty variables, channel unknown');
    $r = $t->request('/lit');
    is(vars($r->body)->{cit}, pseudonym($K1, 'fixed user'),
        'literal citizen value');
    $r = $t->request('/svc');
    is(vars($r->body)->{svc}, 'benefits-2', 'location service overrides');
}

###########################################################################
# access log with all variables

{
    my $r = $t->request('/v', headers => [ 'X-Channel' => 'EMAIL',
        'X-Citizen-ID' => $CITIZEN ]);
    my $id = $r->header('X-Journey-ID') // '';
    my $line = "email|$id|1|$P1|payments|200|/v";
    ok($t->wait_for_log(qr/^\Q$line\E$/m, file => 'cg.log'),
        'access log line with all variables')
        or diag $t->read_file('cg.log');

    $r = $t->request('/v', headers => [ 'X-Journey-ID' => $id ]);
    ok($t->wait_for_log(qr/^\Qunknown|$id|0|\E-?\Q|payments|200|\/v\E$/m,
            file => 'cg.log'),
        'access log line, reused journey, no citizen')
        or diag $t->read_file('cg.log');

    $t->request('/plain');
    ok($t->wait_for_log(qr/^unknown\|-?\|-?\|-?\|payments\|200\|\/plain$/m,
            file => 'cg.log'), 'access log line, journey off: empty values')
        or diag $t->read_file('cg.log');
}

###########################################################################
# stable across reload (new key prepended) and instances

my $b = $t->nginx('b');
my $c = $t->nginx('c');
{
    $b->write_secret_file('keys', \@KEYS);
    $b->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    server {
        listen 127.0.0.1:%%PORT_2%%;
        server_name localhost;
        location /v {
            $CG
            return 200 "$VARS\\n";
        }
    }
EOF
    $b->run;

    # c: same keys, pseudonym key chosen explicitly
    $c->write_secret_file('keys', \@KEYS);
    $c->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys pseudonym_key=k2;
    server {
        listen 127.0.0.1:%%PORT_3%%;
        server_name localhost;
        location /v {
            $CG
            return 200 "$VARS\\n";
        }
    }
EOF
    $c->run;

    my $get = sub {
        my ($inst, $port, @h) = @_;
        my $r = $inst->request('/v', port => $port,
            headers => [ 'X-Citizen-ID' => $CITIZEN, @h ]);
        return vars($r->body);
    };

    is($get->($b, $t->port(2))->{cit}, $P1,
        'second instance, same secret file: same pseudonym');
    is($get->($b, $t->port(2))->{svc}, '', 'no civicgate_service: empty');
    is($get->($c, $t->port(3))->{cit}, pseudonym($K2, $CITIZEN),
        'pseudonym_key=k2 uses k2');

    # journey IDs minted by one instance are accepted by the other
    my $v = $get->($b, $t->port(2), 'X-Journey-ID' => $ID);
    is_deeply([ $v->{jid}, $v->{new} ], [ $ID, 0 ],
        'second instance accepts the first one\'s journey ID');

    # prepend a new key and reload: default pseudonym key stays the last one
    $t->write_secret_file('keys', [ [ 'k3' => $K3 ], @KEYS ]);
    ok($t->reload, 'reload with k3 prepended');
    my $r = $t->request('/v', headers => [ 'X-Citizen-ID' => $CITIZEN ]);
    is(vars($r->body)->{cit}, $P1, 'pseudonym unchanged after rotation+reload');
    my $new = $r->header('X-Journey-ID');
    is(verify_journey_id($new, $K3, $K2, $K1), 0, 'after reload: k3 signs');
    $r = $t->request('/v', headers => [ 'X-Journey-ID' => $ID ]);
    is(vars($r->body)->{new}, 0, 'after reload: old journey ID still valid');

    # the pseudonym key stays k2 in c after rotation there too
    $c->write_secret_file('keys', [ [ 'k3' => $K3 ], @KEYS ]);
    ok($c->reload, 'instance c reloaded with k3 prepended');
    is($get->($c, $t->port(3))->{cit}, pseudonym($K2, $CITIZEN),
        'pseudonym_key=k2 unchanged by rotation');

    # stopping and starting again: same pseudonym
    $b->stop;
    $b->run;
    is($get->($b, $t->port(2))->{cit}, $P1, 'same pseudonym after restart');
}

###########################################################################
# debug level: apart from nginx core's own header/script dumps, no line
# carries the raw citizen value

my $d = $t->nginx('d');
{
    $d->write_secret_file('keys', \@KEYS);
    $d->write_nginx_conf(<<"EOF", error_log_level => 'debug');
    civicgate_secret_file %%TESTDIR%%/keys;
    server {
        listen 127.0.0.1:%%PORT_4%%;
        server_name localhost;
        location /v {
            $CG
            return 200 "$VARS\\n";
        }
    }
EOF
    $d->run;
    my $r = $d->request('/v', port => $t->port(4),
        headers => [ 'X-Citizen-ID' => $CITIZEN, 'X-Channel' => 'app' ]);
    is(vars($r->body)->{cit}, $P1, 'debug instance: pseudonym');
    $d->stop;
    my @lines = grep {
        /\Q$CITIZEN\E/i
            && !/\[debug\] .*(?:http header: "|http script var: ")/
    } split /\n/, $d->error_log;
    ok(!@lines, 'debug log: raw citizen only in nginx core header/script lines')
        or diag join "\n", @lines;
    like($d->error_log, qr/\[debug\]/, 'debug log is on');
}

###########################################################################
# the raw citizen value is in no log

{
    # give the logs time to be written
    $t->request('/v', headers => [ 'X-Citizen-ID' => $CITIZEN ]);
    $t->wait_for_log(qr/\|\/v$/m, file => 'cg.log');
    $t->stop;
    $b->stop;
    $c->stop;
    for my $inst ($t, $b, $c) {
        opendir my $dh, $inst->testdir or next;
        for my $f (sort grep { /\.log$/ } readdir $dh) {
            my $text = $inst->read_file($f) // '';
            unlike($text, qr/\Q$CITIZEN\E/i,
                $inst->name . "/$f: raw citizen value absent");
        }
    }
    my @logs = grep { /\.log$/ } do {
        opendir my $dh, $t->testdir; readdir $dh;
    };
    ok(scalar(grep { $_ eq 'cg.log' } @logs) && (-s $t->testdir . '/cg.log'),
        'custom access log was written');
}

$t->done_testing;
