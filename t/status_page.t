#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The status page in a real browser: headless Chromium driven by
# t/lib/status_page_browser.py (Selenium).  The page renders the status;
# an admin change appears without reload within 1 s, through
# Server-Sent Events and, without EventSource or when the stream is
# refused, through long-poll (the latencies measured); a hostile message
# stays text; no policy violation or script error; the contrast of its
# text; the language switch with the keyboard; a genuine notice code (as
# copied from an SMS) shows "official" and a forged one "not official"; a
# typed-in journey ID, or the journey cookie, shows its
# timeline, and new steps appear; after a reload the stream resumes with
# Last-Event-ID; the data-use part stays hidden when its path fails or no
# citizen is signed in, and shows a signed-in citizen's uses; the
# page works with JavaScript disabled and on a 360 px wide screen.
#
# Skips only when Chromium, its driver or Selenium is missing or Chromium
# cannot start; with CI=true that is a failure instead.
# CIVICGATE_SCREENSHOTS=DIR also saves the screenshots of docs/ there.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);
use Civicgate::Sign qw(ed25519_key);

my $PYTHON = '/usr/bin/python3';
my $SCRIPT = "$FindBin::Bin/lib/status_page_browser.py";
my $CI = ($ENV{CI} // '') eq 'true';

sub unavailable {
    my ($why) = @_;
    if ($CI) {
        fail("the browser test must run in CI: $why");
        done_testing();
        exit 1;
    }
    plan skip_all => $why;
}

for my $f ('/usr/bin/chromium', '/usr/bin/chromedriver', $PYTHON) {
    unavailable("$f is missing (scripts/deps.sh test)") unless -x $f;
}
unavailable('python3-selenium is missing (scripts/deps.sh test)')
    if system($PYTHON, '-c', 'import selenium') != 0;

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);
ed25519_key($t, 'signing.pem');

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_signing_key %%TESTDIR%%/signing.pem;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
    }

    log_format resume '$request_uri "$http_last_event_id"';

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location /tax/ {
            civicgate_journey on;
            civicgate_service tax;
            return 200 "tax\n";
        }
        location /health/ {
            civicgate_service health-records;
            return 200 "health\n";
        }
        location /status/ {
            civicgate_status;
            civicgate_status_heartbeat 1s;
            access_log %%TESTDIR%%/status.log resume;
        }
        location = /page {
            civicgate_status_page;
        }
        location /pollonly/ {
            if ($http_accept ~ event-stream) {
                return 503;
            }
            civicgate_status;
        }
        location = /page-poll {
            civicgate_status_page status=/pollonly/ uses=/consents/uses;
        }
        location /civicgate/admin/ {
            civicgate_admin;
        }

        # the agency's sign-in sets the citizen from its session cookie
        location /clinic/ {
            civicgate_citizen $cookie_citizen;
            civicgate_channel $arg_channel;
            civicgate_journey on secure=off;
            civicgate_service clinic;
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }
        location /me/consents/ {
            civicgate_citizen $cookie_citizen;
            civicgate_consent_api;
        }
        location = /page-uses {
            civicgate_status_page uses=/me/consents/uses;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        civicgate_journey off;
        location / {
            return 200 "ok\n";
        }
    }
EOF

$t->run_redis;
$t->run;

my $port = $t->port(0);
ok($t->wait_until(sub { fresh(json_of($t->request('/status/'))) },
                  timeout => 10), 'status read from Redis');

# a journey with a step on "tax", as a citizen would have it
my $jid = $t->request('/tax/')->header('X-Journey-ID');
like($jid, journey_id_re(), 'a journey');
ok($t->wait_until(sub {
        my $d = json_of($t->request("/status/journeys/$jid"));
        $d && @{ $d->{steps} // [] } }, timeout => 10),
   'its first step recorded');

# a signed-in citizen whose data two services used
my $CITIZEN = 'NIK-3171000000000042';
is($t->request('/me/consents/health', method => 'PUT', body => '{}',
               headers => [ Cookie => "citizen=$CITIZEN" ])->status, 201,
   'consent granted');
for my $ch (qw(web app)) {
    is($t->request("/clinic/?channel=$ch",
                   headers => [ Cookie => "citizen=$CITIZEN" ])->status, 200,
       "a use through $ch");
}
ok($t->wait_until(sub {
        my $d = json_of($t->request('/me/consents/uses',
                        headers => [ Cookie => "citizen=$CITIZEN" ]));
        $d && @{ $d->{uses} // [] } == 2 }, timeout => 10),
   'both uses in the log');

local $ENV{CG_PAGE} = "http://127.0.0.1:$port/page";
local $ENV{CG_PAGE_USES} = "http://127.0.0.1:$port/page-uses";
local $ENV{CG_CITIZEN} = $CITIZEN;
local $ENV{CG_PAGE_POLL} = "http://127.0.0.1:$port/page-poll";
local $ENV{CG_ADMIN} = "http://127.0.0.1:$port/civicgate/admin/services/";
local $ENV{CG_JOURNEY} = $jid;
local $ENV{CG_STEP} = "http://127.0.0.1:$port/tax/";
local $ENV{CG_NGINX_PID} = $t->pid;
local $ENV{CG_SHOTS} = $ENV{CIVICGATE_SCREENSHOTS}
    if $ENV{CIVICGATE_SCREENSHOTS};
local $ENV{HOME} = $t->topdir;       # Chromium's profile and caches

my $pid = open(my $fh, '-|', 'timeout', '-k', '5', '150', $PYTHON, $SCRIPT)
    // die "$SCRIPT: $!";
my ($results, $skip, $done) = (0, undef, 0);
while (my $line = <$fh>) {
    chomp $line;
    if ($line =~ /^skip (.*)/) {
        $skip = $1;
    } elsif ($line =~ /^ok (.*)/) {
        pass($1);
        $results++;
    } elsif ($line =~ /^not ok (.*)/) {
        fail($1);
        $results++;
    } elsif ($line eq 'done') {
        $done = 1;
    } elsif ($line =~ /^metric (\S+) (\S+)/) {
        diag("$1: $2");
    } else {
        diag($line);
    }
}
close $fh;
my $rc = $? >> 8;

if (defined $skip && !$results) {
    $t->stop;
    $t->stop_redis;
    unavailable($skip);
}

is($rc, 0, 'the browser script exited cleanly');
ok($done, 'the browser script ran to its end');
is($results, 44, 'every browser check reported');

# the page's stream came back with the ID of the last event it had
like($t->read_file('status.log') // '', qr{^/status/\?lang=id "\d+-\d+"$}m,
     'the stream resumed with Last-Event-ID');

$t->done_testing;
