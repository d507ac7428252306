// The sign-in form keeps the page's address: a link to a job (#/jobs/ID) that led here
// leads there again once signed in. The fragment never reaches the server; the browser
// keeps it across the form's redirect to /ui/.
const form = document.querySelector("form[action='/ui/login']");
if (form && /^#\/[\w/?=&%.,-]*$/.test(location.hash)) {
  form.action = `/ui/login${location.hash}`;
}
