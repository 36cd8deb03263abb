#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Configuration errors are reported by "nginx -t" with [emerg], the
# directive (or the file) and "in .../nginx.conf:LINE"; valid
# configurations pass and serve.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $GOOD = random_key_hex(32);
my $GOOD2 = random_key_hex(40);

my $SERVER = <<'EOF';
    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        location / {
            civicgate_journey on;
            return 200 "ok\n";
        }
    }
EOF

# name => {
#   keys    => secret file text (written as "keys" in the instance dir),
#   http    => http block (default: secret file directive + $SERVER),
#   line    => regex of the line nginx must point at (undef: any line),
#   like    => regex the output must match (besides [emerg] and in FILE:LINE)
# }
my @cases = (
    {
        name => 'secret file missing',
        http => "civicgate_secret_file %%TESTDIR%%/no-such-file;\n$SERVER",
        line => qr/civicgate_secret_file/,
        like => qr/no-such-file/,
    },
    {
        name => 'secret file is a directory (unreadable)',
        http => "civicgate_secret_file %%TESTDIR%%/keydir;\n$SERVER",
        setup => sub { mkdir $_[0]->testdir . '/keydir' },
        line => qr/civicgate_secret_file/,
        like => qr/civicgate_secret_file|keydir/,
    },
    ($> != 0 ? ({
        name => 'secret file mode 000 (unreadable)',
        keys => "k $GOOD\n",
        setup => sub { chmod 0, $_[0]->testdir . '/keys' },
        line => qr/civicgate_secret_file/,
        like => qr/civicgate_secret_file|keys/,
    }) : ()),
    {
        name => 'key of 31 bytes',
        keys => 'short ' . random_key_hex(31) . "\n",
    },
    {
        name => 'short key after a good one',
        keys => "good $GOOD\nshort " . random_key_hex(31) . "\n",
    },
    {
        name => 'key of 129 bytes',
        keys => 'long ' . random_key_hex(129) . "\n",
    },
    {
        name => 'bad hex digit',
        keys => 'bad ' . substr($GOOD, 0, 40) . 'g' . substr($GOOD, 41) . "\n",
    },
    {
        name => 'odd number of hex digits',
        keys => 'odd ' . $GOOD . "a\n",
    },
    {
        name => 'key id without key',
        keys => "lonely\n",
    },
    {
        name => 'key id with a slash',
        keys => "bad/id $GOOD\n",
    },
    {
        name => 'key id of 33 chars',
        keys => ('i' x 33) . " $GOOD\n",
    },
    {
        name => 'duplicate key id',
        keys => "same $GOOD\nsame $GOOD2\n",
        like => qr/civicgate_secret_file|keys|same|duplicate/,
    },
    {
        name => 'empty secret file',
        keys => '',
    },
    {
        name => 'only comments and blank lines',
        keys => "# nothing here\n\n   \n# $GOOD\n",
    },
    {
        name => 'unknown pseudonym_key',
        keys => "a $GOOD\nb $GOOD2\n",
        http => "civicgate_secret_file %%TESTDIR%%/keys pseudonym_key=c;\n$SERVER",
        like => qr/civicgate_secret_file|pseudonym_key|\/keys"/,
    },
    {
        name => 'unknown parameter on civicgate_secret_file',
        keys => "a $GOOD\n",
        http => "civicgate_secret_file %%TESTDIR%%/keys colour=blue;\n$SERVER",
        like => qr/civicgate_secret_file|colour/,
    },
    {
        name => 'civicgate_secret_file repeated',
        keys => "a $GOOD\n",
        http => "civicgate_secret_file %%TESTDIR%%/keys;\n"
            . "civicgate_secret_file %%TESTDIR%%/keys; # second\n$SERVER",
        line => qr/# second/,
        like => qr/"civicgate_secret_file" directive is duplicate/,
    },
    {
        name => 'civicgate_secret_file in server context',
        keys => "a $GOOD\n",
        http => "server { listen 127.0.0.1:%%PORT_0%%;\n"
            . "civicgate_secret_file %%TESTDIR%%/keys; }\n",
        line => qr/civicgate_secret_file/,
        like => qr/"civicgate_secret_file" directive is not allowed here/,
    },
    {
        name => 'unknown parameter on civicgate_journey',
        keys => "a $GOOD\n",
        http => "civicgate_secret_file %%TESTDIR%%/keys;\n"
            . "server { listen 127.0.0.1:%%PORT_0%%;\n"
            . "location / { civicgate_journey on bogus=1; } }\n",
        line => qr/civicgate_journey/,
        like => qr/civicgate_journey|bogus/,
    },
    (map {
        my $arg = $_;
        {
            name => "civicgate_journey $arg",
            keys => "a $GOOD\n",
            http => "civicgate_secret_file %%TESTDIR%%/keys;\n"
                . "server { listen 127.0.0.1:%%PORT_0%%;\n"
                . "location / { civicgate_journey $arg; } }\n",
            line => qr/civicgate_journey/,
            # the directive, or the offending parameter, nginx style
            like => qr/civicgate_journey|"\Q${\ (split ' ', $arg)[-1]}\E"/,
        }
    } ('maybe', 'on samesite=loose', 'on secure=yes', 'on httponly=1',
        'on max_age=soon', 'on ttl=forever', 'on header=', 'on cookie=',
        'on path=')),
    {
        name => 'civicgate_journey repeated in a location',
        keys => "a $GOOD\n",
        http => "civicgate_secret_file %%TESTDIR%%/keys;\n"
            . "server { listen 127.0.0.1:%%PORT_0%%;\n"
            . "location / { civicgate_journey on;\n"
            . "civicgate_journey off; # second\n } }\n",
        line => qr/# second/,
        like => qr/"civicgate_journey" directive is duplicate/,
    },
    {
        name => 'civicgate_journey on without civicgate_secret_file',
        http => $SERVER,
        line => undef,
        like => qr/civicgate_journey|civicgate_secret_file/,
    },
    {
        name => 'civicgate_journey on at http level without secret file',
        http => "civicgate_journey on;\n"
            . "server { listen 127.0.0.1:%%PORT_0%%; }\n",
        line => undef,
        like => qr/civicgate_journey|civicgate_secret_file/,
    },
    {
        name => 'civicgate_citizen without civicgate_secret_file',
        http => "server { listen 127.0.0.1:%%PORT_0%%;\n"
            . "location / { civicgate_citizen \$http_x_citizen_id; } }\n",
        line => undef,
        like => qr/civicgate_citizen|civicgate_secret_file/,
    },
    (map {
        my ($list, $why) = @$_;
        {
            name => "civicgate_channels $why",
            http => "civicgate_channels $list;\n"
                . "server { listen 127.0.0.1:%%PORT_0%%; }\n",
            line => qr/civicgate_channels/,
            like => qr/civicgate_channels|"\Q${\ ((split ' ', $list, 2)[-1] =~ s\/"\/\/gr)}\E"/,
        }
    } ([ 'web unknown', 'with reserved "unknown"' ],
       [ 'unknown', 'only "unknown"' ],
       [ 'web UNKNOWN', 'with reserved "UNKNOWN"' ],
       [ 'web Web2', 'with upper case' ],
       [ 'web ' . ('c' x 33), 'with a 33-char name' ],
       [ 'web bad.name', 'with a dot' ],
       [ 'web "a b"', 'with a space' ],
       [ 'web ""', 'with an empty name' ])),
    {
        name => 'civicgate_channels in a location',
        http => "server { listen 127.0.0.1:%%PORT_0%%;\n"
            . "location / { civicgate_channels web; } }\n",
        line => qr/civicgate_channels/,
        like => qr/"civicgate_channels" directive is not allowed here/,
    },
    (map {
        my ($name, $why) = @$_;
        {
            name => "civicgate_service $why",
            http => "server { listen 127.0.0.1:%%PORT_0%%;\n"
                . "civicgate_service $name; }\n",
            line => qr/civicgate_service/,
            like => qr/civicgate_service|"\Q${\ ($name =~ s\/"\/\/gr)}\E"/,
        }
    } ([ 'Payments', 'with upper case' ],
       [ 's' x 65, 'with 65 chars' ],
       [ 'pay.ments', 'with a dot' ],
       [ '""', 'empty' ])),
    {
        name => 'civicgate_metrics in server context',
        http => "server { listen 127.0.0.1:%%PORT_0%%;\n"
            . "civicgate_metrics; }\n",
        line => qr/civicgate_metrics/,
        like => qr/"civicgate_metrics" directive is not allowed here/,
    },
    {
        name => 'civicgate_channel without value',
        http => "server { listen 127.0.0.1:%%PORT_0%%;\n"
            . "location / { civicgate_channel; } }\n",
        line => qr/civicgate_channel;/,
        like => qr/civicgate_channel/,
    },
);

my $n = 0;
for my $c (@cases) {
    my $i = $t->nginx('case' . ++$n);
    $i->write_file('keys', $c->{keys}) if defined $c->{keys};
    my $http = $c->{http} // "civicgate_secret_file %%TESTDIR%%/keys;\n$SERVER";
    $i->write_nginx_conf($http);
    $c->{setup}->($i) if $c->{setup};

    my ($rc, $out) = $i->test_config;
    my $conf = $i->testdir . '/nginx.conf';
    my $keys = $i->testdir . '/keys';
    my $line = $c->{line} // (defined $c->{keys} && !$c->{http}
        ? qr/civicgate_secret_file/ : undef);
    my $like = $c->{like} // qr/civicgate_secret_file|\Q$keys\E/;

    subtest "nginx -t fails: $c->{name}" => sub {
        isnt($rc, 0, 'non-zero exit');
        like($out, qr/\[emerg\]/, '[emerg]');
        like($out, $like, 'names the directive or file');
        if (defined $line) {
            my $ln = $i->conf_line($line);
            like($out, qr/ in \Q$conf\E:$ln\b/, "points at nginx.conf:$ln");
        } else {
            like($out, qr/ in \Q$conf\E:\d+\b/, 'points at nginx.conf:LINE');
        }
        unlike($out, qr/test is successful/, 'not successful');
    } or diag $out;
}

###########################################################################
# valid configurations

my $K32  = random_key_hex(32);
my $K128 = uc random_key_hex(128);
my $ID32 = 'A.b-c_9' . ('x' x 25);
{
    my $v = $t->nginx('valid');
    $v->write_file('keys', "# civicgate keys, newest first\n\n"
        . "new $K32\n"
        . "   \n# retired soon\n"
        . "$ID32 $K128\n"
        . "old " . random_key_hex(32));    # no final newline
    $v->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys pseudonym_key=new;
    civicgate_channels web kiosk walk-in walk_in x;
    civicgate_channel web;
    civicgate_citizen $http_x_citizen_id;
    civicgate_journey off;
    civicgate_service gateway;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        civicgate_channel $http_x_channel;
        civicgate_service permits;
        civicgate_journey on header=X-J cookie=jj path=/a max_age=1h
            secure=off httponly=off samesite=none ttl=1d;

        location / {
            civicgate_channel kiosk;
            civicgate_citizen "static";
            civicgate_service permits_2;
            civicgate_journey on samesite=strict;
            return 200 "[$civicgate_channel][$civicgate_citizen][$civicgate_service]\n";
        }
        location /off {
            civicgate_journey off;
            return 200 "[$civicgate_journey_id]\n";
        }
        location /all {
            civicgate_journey on header=X-Journey-ID cookie=off path=/
                max_age=30d secure=on httponly=on samesite=off ttl=30d;
            return 204;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
    my ($rc, $out) = $v->test_config;
    is($rc, 0, 'valid config: nginx -t exits 0') or diag $out;
    like($out, qr/syntax is ok/, 'valid config: syntax is ok');
    like($out, qr/test is successful/, 'valid config: test is successful');
    unlike($out, qr/\[(?:emerg|alert|crit|warn)\]/, 'valid config: no warnings');

    $v->run;
    my $r = $v->request('/');
    is($r->status, 200, 'valid config serves');
    is($r->body, '[kiosk][' . pseudonym($K32, 'static') . "][permits_2]\n",
        'valid config: location-level values, pseudonym_key=new');
    like($r->header('Set-Cookie') // '', qr/SameSite=Strict/,
        'valid config: location journey parameters');
    is(verify_journey_id($r->header('X-Journey-ID'), $K32), 0,
        'valid config: first key signs');
    my $p = mint_journey_id($K128);
    $r = $v->request('/', headers => [ 'X-Journey-ID' => $p ]);
    is($r->header('X-Journey-ID'), $p, 'valid config: 128-byte key verifies');
    $r = $v->request('/all');
    is($r->status, 204, 'valid config: /all');
    is($r->header('Set-Cookie'), undef, 'valid config: cookie=off');
    $r = $v->request('/metrics');
    is($r->status, 200, 'valid config: metrics');
    my $m = parse_metrics($r->body);
    ok(defined metric($m, 'civicgate_requests_total', channel => 'walk-in'),
        'valid config: custom channels in metrics');
}

{
    # minimal valid configurations: the module loaded, nothing configured;
    # and a 32-byte key file alone
    my $v = $t->nginx('minimal');
    $v->write_nginx_conf("server { listen 127.0.0.1:%%PORT_0%%; }\n");
    my ($rc, $out) = $v->test_config;
    is($rc, 0, 'module loaded without any directive: nginx -t ok')
        or diag $out;

    $v->write_file('keys', "only $K32\n");
    $v->write_nginx_conf("civicgate_secret_file %%TESTDIR%%/keys pseudonym_key=only;\n"
        . "server { listen 127.0.0.1:%%PORT_0%%; }\n");
    ($rc, $out) = $v->test_config;
    is($rc, 0, 'pseudonym_key naming the only key: ok') or diag $out;
}

$t->done_testing;
