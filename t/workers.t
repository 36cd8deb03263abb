#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Two workers: every request gets a valid journey ID, shared-memory
# counters are summed over the workers (also under concurrent load) and
# survive reloads.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use POSIX ();
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JRE = journey_id_re();

my $KA = random_key_hex(32);
my $KB = random_key_hex(32);
$t->write_secret_file('keys', [ [ a => $KA ] ]);

$t->write_nginx_conf(<<'EOF', worker_processes => 2);
    civicgate_secret_file %%TESTDIR%%/keys;

    server {
        # reuseport: the kernel spreads connections over both workers
        listen 127.0.0.1:%%PORT_0%% reuseport;
        server_name localhost;

        location /j {
            civicgate_journey on;
            civicgate_channel web;
            return 200 "$pid $civicgate_journey_id $civicgate_journey_new\n";
        }
        location /metrics {
            civicgate_metrics;
        }
    }
EOF

$t->run;

my @W = $t->worker_pids;
is(scalar @W, 2, 'two worker processes');

my %expect = (minted => 0, reused => 0, forged => 0, web => 0);

sub check_counters {
    my ($name) = @_;
    # several fetches, served by either worker, all see the same sums
    my %seen;
    for (1 .. 8) {
        my $m = $t->metrics;
        my $got = {
            minted => metric($m, 'civicgate_journeys_total', result => 'minted'),
            reused => metric($m, 'civicgate_journeys_total', result => 'reused'),
            forged => metric($m, 'civicgate_journeys_total', result => 'forged'),
            web    => metric($m, 'civicgate_requests_total', channel => 'web'),
        };
        $seen{ join ',', map { $got->{$_} // 'undef' } sort keys %$got }++;
    }
    my $want = join ',', map { $expect{$_} } sort keys %expect;
    is_deeply([ keys %seen ], [ $want ],
        "$name: counters (" . join(' ', map { "$_=$expect{$_}" }
            sort keys %expect) . ') from every fetch');
}

sub get_j {
    my (@h) = @_;
    my $r = $t->request('/j', headers => [ @h ]);
    my ($pid, $id, $new) = split ' ', $r->body // '';
    return { status => $r->status, pid => $pid, id => $id, new => $new,
        header => $r->header('X-Journey-ID') };
}

###########################################################################
# sequential requests

my $N = 200;
my (%ids, %pids, $bad);
for (1 .. $N) {
    my $g = get_j();
    $bad++ unless $g->{status} == 200 && ($g->{header} // '') =~ $JRE
        && $g->{id} eq $g->{header} && $g->{new} eq '1'
        && defined verify_journey_id($g->{id}, $KA);
    $ids{ $g->{id} // '' }++;
    $pids{ $g->{pid} // '' }++;
}
ok(!$bad, "$N requests: all minted valid IDs") or diag "$bad bad";
is(scalar keys %ids, $N, "$N distinct IDs");
is(scalar keys %pids, 2, 'both workers served requests')
    or diag explain \%pids;
$expect{minted} += $N;
$expect{web} += $N;
check_counters('sequential');

my @ids = sort keys %ids;
my $reused_ok = 0;
for my $i (0 .. 49) {
    my $g = get_j('X-Journey-ID' => $ids[$i]);
    $reused_ok++ if $g->{status} == 200 && $g->{id} eq $ids[$i]
        && $g->{new} eq '0';
}
is($reused_ok, 50, '50 IDs reused, whichever worker');
$expect{reused} += 50;
$expect{web} += 50;

for my $i (0 .. 9) {
    my $g = get_j('X-Journey-ID' => mint_journey_id($KB));
    $expect{forged}++;
    $expect{minted}++;
    $expect{web}++;
}
check_counters('reused and forged');

###########################################################################
# concurrent load from several client processes

{
    my ($kids, $per) = (4, 60);
    my @pipes;
    for my $k (1 .. $kids) {
        pipe(my $rd, my $wr) or die "pipe: $!";
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            close $rd;
            my $out = '';
            for my $i (1 .. $per) {
                my $r = parse_response(http_get('/j', port => $t->port(0),
                    headers => ($i % 3 == 0
                        ? [ 'X-Journey-ID' => $ids[$i] ] : []),
                    quiet => 1));
                $out .= ($r->status . ' ' . ($r->body // "\n"));
            }
            print $wr $out;
            close $wr;
            POSIX::_exit(0);
        }
        close $wr;
        push @pipes, [ $pid, $rd ];
    }
    my ($ok, $minted, $reused, %cpids) = (0, 0, 0);
    for my $p (@pipes) {
        my $fh = $p->[1];
        while (my $l = <$fh>) {
            my ($st, $pid, $id, $new) = split ' ', $l;
            next unless $st eq '200' && defined $new;
            next unless defined verify_journey_id($id, $KA);
            $ok++;
            $cpids{$pid}++;
            $new eq '1' ? $minted++ : $reused++;
        }
        waitpid $p->[0], 0;
    }
    is($ok, $kids * $per, 'concurrent: all requests got valid IDs');
    is($reused, $kids * int($per / 3), 'concurrent: reused as sent');
    ok(keys %cpids == 2, 'concurrent: both workers served');
    $expect{minted} += $minted;
    $expect{reused} += $reused;
    $expect{web} += $ok;
    check_counters('concurrent');
}

###########################################################################
# reload

{
    my @before = $t->worker_pids;
    ok($t->reload, 'reload');
    # reload returns once the old workers are shutting down: wait for
    # them to be gone (slow under make test-asan)
    $t->wait_until(sub { my @w = $t->worker_pids; @w == 2 }, timeout => 10);
    my @after = $t->worker_pids;
    is(scalar @after, 2, 'two workers after reload');
    ok(!grep({ my $a = $_; grep { $a == $_ } @before } @after),
        'all workers are new');
    check_counters('after reload');

    for (1 .. 20) {
        get_j();
    }
    $expect{minted} += 20;
    $expect{web} += 20;
    check_counters('after reload and more requests');

    # a second reload with a rotated key file: counters still kept
    $t->write_secret_file('keys', [ [ b => $KB ], [ a => $KA ] ]);
    ok($t->reload, 'reload with a new key');
    my $g = get_j('X-Journey-ID' => $ids[0]);
    is($g->{new}, '0', 'old ID still valid after rotation');
    $expect{reused}++;
    $expect{web}++;
    $g = get_j();
    is(verify_journey_id($g->{id}, $KB, $KA), 0, 'new key signs');
    $expect{minted}++;
    $expect{web}++;
    check_counters('after rotation reload');
}

$t->done_testing;
