# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

"""The status page in a real browser (headless Chromium through Selenium).

Run by t/status_page.t, which starts nginx and Redis first.  Reads its
settings from the environment:

    CG_PAGE        URL of the status page
    CG_PAGE_POLL   URL of a page whose status location refuses streams
                   (503), with uses= on a path that does not exist
    CG_ADMIN       URL of the admin services endpoint, ending in "/"
    CG_JOURNEY     a journey ID with at least one step on service "tax"
    CG_STEP        URL that adds a step on "tax" to a journey (X-Journey-ID)
    CG_NGINX_PID   nginx's master: signalled to reload, which ends streams
    CG_SHOTS       optional: a directory for screenshots (desktop, phone)

Writes one line per result on stdout, for the Perl test to turn into TAP:

    ok NAME | not ok NAME: DETAIL | metric NAME VALUE | skip REASON
"""

import json
import os
import signal
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

PAGE = os.environ['CG_PAGE']
PAGE_POLL = os.environ['CG_PAGE_POLL']
ADMIN = os.environ['CG_ADMIN']
JOURNEY = os.environ['CG_JOURNEY']
STEP = os.environ['CG_STEP']
NGINX_PID = int(os.environ['CG_NGINX_PID'])
PAGE_USES = os.environ['CG_PAGE_USES']
CITIZEN = os.environ['CG_CITIZEN']
SHOTS = os.environ.get('CG_SHOTS')


def out(line):
    print(line, flush=True)


def check(name, cond, detail=''):
    out(('ok ' if cond else 'not ok ') + name
        + ('' if cond else ': ' + str(detail)))
    return cond


def browser(javascript=True, width=1280, height=900):
    opts = webdriver.ChromeOptions()
    opts.binary_location = '/usr/bin/chromium'
    opts.add_argument('--headless=new')
    opts.add_argument('--disable-gpu')
    opts.add_argument('--disable-dev-shm-usage')
    opts.add_argument('--no-first-run')
    opts.add_argument('--window-size=%d,%d' % (width, height))
    if os.geteuid() == 0:
        opts.add_argument('--no-sandbox')
    # Accept-Language: the page comes in Indonesian first
    prefs = {'intl.accept_languages': 'id,en'}
    if not javascript:
        prefs['profile.managed_default_content_settings.javascript'] = 2
    opts.add_experimental_option('prefs', prefs)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    d = webdriver.Chrome(service=Service('/usr/bin/chromedriver'),
                         options=opts)
    # every violation of the page's policy, from the first byte
    d.execute_cdp_cmd('Page.addScriptToEvaluateOnNewDocument', {'source': (
        "window.cgViolations = [];"
        "document.addEventListener('securitypolicyviolation', function (e) {"
        " window.cgViolations.push(e.violatedDirective + ' ' + e.blockedURI);"
        "});")})
    return d


def clean(d, label):
    """No policy violation and no script error on the page so far."""
    v = d.execute_script('return window.cgViolations;')
    check(label + ': no Content-Security-Policy violation', v == [], v)
    # a 404 the page asked for (a forged code) is logged too: not an error
    errors = [e['message'] for e in d.get_log('browser')
              if e['level'] == 'SEVERE'
              and 'Failed to load resource' not in e['message']]
    check(label + ': no script error', errors == [], errors)


def admin(name, body):
    req = urllib.request.Request(ADMIN + name, method='PUT',
                                 data=json.dumps(body).encode(),
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def admin_notice(name, body):
    """An admin change; the notice code of its answer."""
    req = urllib.request.Request(ADMIN + name, method='PUT',
                                 data=json.dumps(body).encode(),
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read().decode()).get('notice')


def wait(driver, script, timeout=5.0):
    """Until the script returns something true; returns it, or None."""
    end = time.time() + timeout
    while time.time() < end:
        v = driver.execute_script(script)
        if v:
            return v
        time.sleep(0.02)
    return None


# the time (Date.now()) when the service's badge first shows the state
WATCH = """
window.cgSeen = null;
var want = arguments[0], name = arguments[1];
new MutationObserver(function () {
  var b = document.querySelector('li[data-name="' + name + '"] .badge');
  if (window.cgSeen === null && b && b.classList.contains('s-' + want)) {
    window.cgSeen = Date.now();
  }
}).observe(document.getElementById('services'),
           { childList: true, subtree: true, characterData: true });
"""


def update_latency(driver, name, state, label):
    """An admin change, and how long until the page shows it, in ms."""
    driver.execute_script(WATCH, state, name)
    t0 = time.time() * 1000
    admin(name, {'state': state,
                 'message': {'id': 'Uji ' + state, 'en': 'Test ' + state}})
    seen = wait(driver, 'return window.cgSeen;', 3)
    ms = (seen - t0) if seen else None
    check(label + ': change shown without reload', seen is not None)
    if ms is not None:
        out('metric %s_ms %.1f' % (label, ms))
        check(label + ': within 1 s (%.0f ms)' % ms, ms < 1000, ms)
    return ms


CONTRAST = """
function lum(c) {
  var m = c.match(/[0-9.]+/g).map(Number);
  var v = m.slice(0, 3).map(function (x) {
    x /= 255;
    return x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4);
  });
  return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2];
}
function bg(e) {
  for (; e; e = e.parentElement) {
    var c = getComputedStyle(e).backgroundColor;
    var a = c.match(/[0-9.]+/g).map(Number);
    if (a.length < 4 || a[3] > 0) { return c; }
  }
  return 'rgb(255, 255, 255)';
}
var worst = null;
document.querySelectorAll('h1, h2, h3, p, a, span, li, label, button, time')
  .forEach(function (e) {
    if (!e.textContent.trim() || e.offsetParent === null) { return; }
    var l1 = lum(getComputedStyle(e).color), l2 = lum(bg(e));
    var r = (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
    if (worst === null || r < worst[0]) {
      worst = [r, e.tagName + '.' + e.className];
    }
  });
return worst;
"""


def timing(d, label):
    """Navigation Timing of the page just loaded: a fresh browser or not."""
    nav = d.execute_script(
        "var n = performance.getEntriesByType('navigation')[0];"
        "var p = performance.getEntriesByName('first-contentful-paint')[0];"
        "return [n.responseEnd, n.domContentLoadedEventEnd,"
        " p ? p.startTime : null, n.decodedBodySize];")
    out('metric %s_response_end_ms %.1f' % (label, nav[0]))
    out('metric %s_dom_content_loaded_ms %.1f' % (label, nav[1]))
    if nav[2] is not None:
        out('metric %s_first_contentful_paint_ms %.1f' % (label, nav[2]))
    out('metric page_bytes %d' % nav[3])


def live_page(d):
    d.get(PAGE)
    check('renders the status',
          len(d.find_elements(By.CSS_SELECTOR, '#services li')) == 3
          and d.find_element(By.CSS_SELECTOR,
                             'li[data-name="tax"] .badge').text != '')
    timing(d, 'cold')
    d.get(PAGE)
    timing(d, 'warm')
    check('live updates connected (EventSource)',
          wait(d, "return document.getElementById('conn').textContent"
                  " === 'Pembaruan langsung aktif.';"), d.page_source[:200])
    update_latency(d, 'tax', 'outage', 'sse_update')
    check('change announced in the aria-live region',
          'tax' in d.find_element(By.ID, 'live').text,
          d.find_element(By.ID, 'live').text)
    hostile = '<img src=x onerror="window.cgPwned=1"><script>window.cgPwned=2</script>'
    admin('health-records', {'state': 'degraded', 'message': {'id': hostile}})
    shown = wait(d, "var m = document.querySelector("
                    "'li[data-name=\"health-records\"] .msg');"
                    "return m && m.textContent;")
    check('hostile message shown as text', shown == hostile, shown)
    check('hostile message inert',
          d.execute_script("return window.cgPwned === undefined"
                           " && !document.querySelector('#services img,"
                           " #services script');"))
    worst = d.execute_script(CONTRAST)
    out('metric worst_contrast %.2f' % worst[0])
    check('contrast at least 4.5:1 (worst %.2f, %s)' % tuple(worst),
          worst[0] >= 4.5, worst)
    clean(d, 'live page')


def forms(d):
    field = d.find_element(By.ID, 'notice')
    field.send_keys('ZZZZZ-99999' + Keys.ENTER)
    text = wait(d, "var r = document.getElementById('notice-result');"
                   "return r.className.indexOf('bad') >= 0 && r.textContent;")
    check('forged notice code: not official',
          text is not None and 'Tidak resmi' in text, text)
    check('the check stays on the page (no navigation)',
          '?notice' not in d.current_url, d.current_url)
    code = admin_notice('health-records', {'state': 'maintenance',
                                           'message': {'id': 'Perawatan',
                                                       'en': 'Upkeep'}})
    field = d.find_element(By.ID, 'notice')
    field.clear()
    # as a citizen copies it from an SMS: lower case, no hyphen
    field.send_keys((code or '').lower().replace('-', '') + Keys.ENTER)
    text = wait(d, "var r = document.getElementById('notice-result');"
                   "return r.className.indexOf('ok') >= 0 && r.textContent;")
    check('genuine notice code: official, with its service and message',
          text is not None and 'Pemberitahuan resmi' in text
          and 'health-records' in text and 'Perawatan' in text, (code, text))
    field = d.find_element(By.ID, 'journey')
    field.send_keys(JOURNEY.lower().replace('-', '') + Keys.ENTER)
    steps = wait(d, "var l = document.querySelectorAll("
                    "'#journey-result ol.steps li');"
                    "return l.length && Array.prototype.map.call(l,"
                    " function (e) { return e.textContent; });")
    check('journey timeline shown for a typed-in ID',
          bool(steps) and 'tax' in steps[0], steps)
    field.clear()
    field.send_keys('ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ' + Keys.ENTER)
    text = wait(d, "var r = document.getElementById('journey-result');"
                   "return r.className.indexOf('bad') >= 0 && r.textContent;")
    check('unknown journey: not found', bool(text), text)
    clean(d, 'forms')


def journey_live(d):
    field = d.find_element(By.ID, 'journey')
    field.clear()
    field.send_keys(JOURNEY + Keys.ENTER)
    n = wait(d, "return document.querySelectorAll("
                "'#journey-result ol.steps li').length;")
    time.sleep(0.5)
    t0 = time.time()
    req = urllib.request.Request(STEP, headers={'X-Journey-ID': JOURNEY})
    urllib.request.urlopen(req, timeout=5).read()
    more = wait(d, "return document.querySelectorAll("
                   "'#journey-result ol.steps li').length > %d;" % n)
    ms = (time.time() - t0) * 1000
    check('journey: a new step appears without reload', more)
    if more:
        out('metric journey_step_ms %.1f' % ms)


def resume(d):
    """The stream ends (reload); a change made meanwhile still arrives."""
    d.get(PAGE)
    wait(d, "return document.getElementById('conn').textContent"
            " === 'Pembaruan langsung aktif.';")
    os.kill(NGINX_PID, signal.SIGHUP)
    cut = wait(d, "return document.getElementById('conn').textContent"
                  " === 'Pembaruan terputus; mencoba lagi.';", 5)
    check('reload: the stream ends', cut)
    admin('tax', {'state': 'degraded'})
    seen = wait(d, "return document.querySelector("
                   "'li[data-name=\"tax\"] .s-degraded') !== null;", 8)
    check('reconnected: the change made meanwhile shown', seen)
    check('reconnected: live again',
          wait(d, "return document.getElementById('conn').textContent"
                  " === 'Pembaruan langsung aktif.';"))


def keyboard_switch(d):
    """The language switch, reached and used with the keyboard only."""
    body = d.find_element(By.TAG_NAME, 'body')
    body.click()
    for _ in range(12):
        d.switch_to.active_element.send_keys(Keys.TAB)
        if d.switch_to.active_element.get_attribute('hreflang') == 'en':
            break
    check('language switch reachable with Tab',
          d.switch_to.active_element.get_attribute('hreflang') == 'en')
    navigate(d, lambda: d.switch_to.active_element.send_keys(Keys.ENTER))
    ok = wait(d, "return document.documentElement.lang === 'en'"
                 " && document.querySelector('h1').textContent;")
    check('language switch: English page', ok == 'Service status', ok)
    check('English live text',
          wait(d, "return document.getElementById('conn').textContent"
                  " === 'Live updates on.';"))


def long_poll(d):
    d.execute_cdp_cmd('Page.addScriptToEvaluateOnNewDocument',
                      {'source': 'delete window.EventSource;'})
    d.get(PAGE)
    check('without EventSource: long-poll',
          wait(d, "return document.getElementById('conn').textContent"
                  " === 'Pembaruan berkala aktif.';"))
    update_latency(d, 'tax', 'maintenance', 'longpoll_update')


def refused(d):
    """The stream refused: long-poll; and the data-use part stays hidden."""
    d.get(PAGE_POLL)
    check('stream refused (503): long-poll',
          wait(d, "return document.getElementById('conn').textContent"
                  " === 'Pembaruan berkala aktif.';"))
    update_latency(d, 'tax', 'degraded', 'refused_longpoll_update')
    check('data-use part: hidden while its path answers 404',
          d.execute_script("var u = document.getElementById('uses');"
                           "return u !== null && u.hidden;"))
    clean(d, 'refused stream')


def journey_cookie(d):
    """The browser's own journey cookie: its timeline without typing."""
    d.get(PAGE)
    d.add_cookie({'name': 'cg_journey', 'value': JOURNEY})
    d.get(PAGE)
    steps = wait(d, "return document.querySelectorAll("
                    "'#journey-result ol.steps li').length;")
    check('journey cookie: its timeline shown', bool(steps), steps)
    d.delete_all_cookies()


def signed_in(d):
    """A citizen signed in (the agency's session cookie): who used the data."""
    d.get(PAGE_USES)
    hidden = d.execute_script("return document.getElementById('uses').hidden;")
    check('data-use part: hidden without a signed-in citizen', hidden, hidden)
    d.add_cookie({'name': 'citizen', 'value': CITIZEN})
    d.get(PAGE_USES)
    items = wait(d, "var u = document.getElementById('uses');"
                    "var l = u.querySelectorAll('li');"
                    "return !u.hidden && l.length && Array.prototype.map.call("
                    "l, function (e) { return e.textContent; });")
    check('signed in: the uses of the data shown, labelled, newest first',
          bool(items) and len(items) == 2 and 'Layanan kesehatan' in items[0]
          and 'clinic' in items[0] and 'melalui web' in items[1], items)
    d.delete_all_cookies()
    clean(d, 'data-use part')


def gone(old):
    """The old page's root is gone: stale, or (Chromium, while it
    navigates) a node that no longer belongs to the document."""
    def predicate(_):
        try:
            old.is_enabled()
            return False
        except WebDriverException:
            return True
    return predicate


def navigate(d, action):
    """An action that loads a new page (a link, a form): until it is loaded."""
    old = d.find_element(By.TAG_NAME, 'html')
    action()
    WebDriverWait(d, 10).until(gone(old))
    WebDriverWait(d, 10).until(lambda d: d.execute_script(
        'return document.readyState;') == 'complete')


def no_javascript():
    d = browser(javascript=False)
    try:
        d.get(PAGE)
        check('JavaScript disabled: services rendered',
              len(d.find_elements(By.CSS_SELECTOR, '#services li .badge'))
              == 3)
        check('JavaScript disabled: the script did not run',
              d.find_element(By.ID, 'conn').text.startswith('Halaman ini'),
              d.find_element(By.ID, 'conn').text)
        navigate(d, lambda: d.find_element(
            By.CSS_SELECTOR, 'a[hreflang="en"]').click())
        check('JavaScript disabled: language switch',
              d.find_element(By.TAG_NAME, 'h1').text == 'Service status')
        navigate(d, lambda: d.find_element(By.ID, 'notice').send_keys(
            '<b>' + Keys.ENTER))
        res = d.find_element(By.ID, 'notice-result').text
        check('JavaScript disabled: a malformed code is not official',
              res.startswith('Not official'), res)
        d.find_element(By.ID, 'notice').clear()
        navigate(d, lambda: d.find_element(By.ID, 'notice').send_keys(
            'ZZZZZ-99999' + Keys.ENTER))
        links = d.find_elements(By.CSS_SELECTOR, '#notice-result a')
        check('JavaScript disabled: a code links to the notice endpoint',
              len(links) == 1
              and links[0].get_attribute('href').endswith(
                  '/status/notices/ZZZZZ-99999'))
    finally:
        d.quit()


def small_screen(d):
    d.set_window_size(360, 740)
    d.get(PAGE)
    wide = d.execute_script('return document.documentElement.scrollWidth;')
    inner = d.execute_script('return window.innerWidth;')
    check('360 px wide: no horizontal scrolling (%d <= %d)' % (wide, inner),
          wide <= inner)


def screenshots(d):
    req = urllib.request.Request(ADMIN + 'tax', method='DELETE')
    urllib.request.urlopen(req, timeout=5).read()
    admin('health-records', {'state': 'maintenance', 'message': {
        'id': 'Pemeliharaan terjadwal, 22.00-02.00 WIB',
        'en': 'Scheduled maintenance, 22:00-02:00 WIB'},
        'since': '2026-12-06T15:00:00Z', 'until': '2026-12-06T19:00:00Z'})
    for name, w, h, mobile in (('status-page.png', 1280, 0, False),
                               ('status-page-phone.png', 390, 844, True)):
        d.get(PAGE + '?lang=en')
        wait(d, "return document.getElementById('conn').textContent"
                " === 'Live updates on.';")
        if not h:
            h = d.execute_script('return document.documentElement'
                                 '.scrollHeight;')
        d.execute_cdp_cmd('Emulation.setDeviceMetricsOverride', {
            'width': w, 'height': h, 'deviceScaleFactor': 1,
            'mobile': mobile})
        time.sleep(0.3)
        d.save_screenshot(os.path.join(SHOTS, name))
        d.execute_cdp_cmd('Emulation.clearDeviceMetricsOverride', {})
        out('metric screenshot_%s %dx%d' % (name, w, h))


def main():
    try:
        d = browser()
    except WebDriverException as e:
        out('skip chromium cannot start: ' + str(e).splitlines()[0])
        return
    try:
        live_page(d)
        forms(d)
        journey_live(d)
        resume(d)
        keyboard_switch(d)
        long_poll(d)
    finally:
        d.quit()
    no_javascript()
    d = browser()
    try:
        refused(d)
        journey_cookie(d)
        signed_in(d)
        small_screen(d)
        if SHOTS:
            screenshots(d)
    finally:
        d.quit()


if __name__ == '__main__':
    main()
    out('done')
    sys.exit(0)
